"""Flower strategies with per-site bookkeeping, update screening and FedBN.

``SiteAwareStrategy`` is a mixin over Flower's own ``FedAvg`` / ``FedProx`` / ``FedAdam``: before
the parent aggregates, it names every reply's site (the ``"site"`` ConfigRecord, remembered per
``msg.metadata.src_node_id``), rejects updates that are NaN/Inf or do not match the global
model's keys and shapes, and, under FedBN, takes the normalisation layers out of the update so
they stay local. What happened to each site is collected for the run log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from server.federation.polling import DEFAULT_POLL_INTERVAL, PollingGrid, is_in_memory
from shared.ood import site_from_metrics
from shared.runconfig import RunConfig
from shared.wire import PackedRecordError, is_packed, unpack_record

__all__ = [
    "SiteAwareStrategy",
    "build_strategy",
    "check_update",
    "short_reason",
    "EARLY_EVAL_PREFIX",
    "resolve_eval_with_train",
]

# Train replies carry the site's aggregate intensity summary under this record (client/task.py).
OOD_RECORD = "ood-reference"
# Train replies carry the evaluation of the model they were sent (eval-with-train) under this prefix.
EARLY_EVAL_PREFIX = "eval/"

log = logging.getLogger("fedmri.federation")


def resolve_eval_with_train(value, grid) -> bool:
    """Run config ``eval-with-train``: true, false, or "auto" (default): on in a deployment, where every
    message costs a fresh ClientApp process, off in the Simulation Engine, whose warm actors make a
    separate evaluate message cheap (its rounds then look exactly as before)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    if text != "auto":
        raise ValueError(f"run config 'eval-with-train': expected true, false or \"auto\", got {value!r}")
    return not is_in_memory(grid)


def check_update(arrays: ArrayRecord, expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why an update cannot be aggregated (wrong keys, wrong shape, NaN/Inf), or None if it can."""
    if is_packed(arrays):  # still packed: the grid could not unpack it (shared.wire)
        try:
            arrays = unpack_record(arrays)
        except PackedRecordError as exc:
            return str(exc)
    keys = set(arrays.keys())
    if keys != set(expected):
        missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
        return f"parameter keys differ from the global model (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, array in arrays.items():
        if tuple(array.shape) != tuple(expected[key]):
            return f"{key}: shape {tuple(array.shape)}, expected {tuple(expected[key])}"
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"{key}: contains NaN or Inf"
    return None


def short_reason(reason: str, limit: int = 500) -> str:
    """The useful line of a ClientApp error (Ray wraps it in a traceback, the SuperNode in ``<class ..>:<'..'>``)."""
    text = reason.strip()
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
    match = re.match(r"<class '([\w.]+)'>:<'(.*)'>$", text, re.S)
    if match:
        text = f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"
    text = text.strip().removesuffix("'>").strip()
    return text[:limit]


class SiteAwareStrategy:
    """Mixin: per-site metrics, update screening and FedBN local norm layers over a Flower strategy.

    Args:
        expected_shapes: key -> shape of every parameter a site must send (the full state dict).
        norm_keys: normalisation keys; under ``fedbn`` they are never aggregated into the global model.
        fedbn: keep ``norm_keys`` local (FedBN). The averaged norm layers are kept apart in
            ``norm_state`` only so that checkpoints are complete networks.
        expected_sites: site names that should answer every round (to name missing ones).
        round_offset: rounds already done before a resume; logged rounds are global rounds.
        min_sites: fewest valid updates needed to aggregate; fewer keeps the global model.
        eval_with_train: one message per site and round: from round 2 on, each train message asks the
            site to evaluate the model it receives (the previous round's global model) before training,
            and only the last round sends separate evaluate messages. ``pop_early_eval()`` hands the
            previous round's evaluation over; the numbers are those a separate evaluate round gives.
        poll_interval: seconds between reply pulls (``PollingGrid``; Flower's own Grid waits 3 s).
        identities: node id -> site name, from the registered SuperNode keys (``launcher``). When given,
            a reply whose node is unknown or that names another site is refused; without it, a site name
            that another node already answered with this round is refused.
    """

    def __init__(
        self,
        *args,
        expected_shapes: dict[str, tuple[int, ...]],
        norm_keys: set[str],
        fedbn: bool,
        expected_sites: Iterable[str] = (),
        round_offset: int = 0,
        norm_state: ArrayRecord | None = None,
        eval_with_train: bool = False,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        identities: Mapping[int, str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.identities = {int(k): str(v) for k, v in (identities or {}).items()}
        self.eval_with_train = bool(eval_with_train)
        self.poll_interval = float(poll_interval)
        self.num_rounds = 0
        self.early_eval: dict = {}
        self._grid: PollingGrid | None = None
        self.expected_shapes = dict(expected_shapes)
        self.norm_keys = set(norm_keys)
        self.fedbn = fedbn
        self.expected_sites = list(expected_sites)
        self.round_offset = round_offset
        self.norm_state = norm_state
        self.site_of: dict[int, str] = {}
        self.ood_refs: dict[str, dict] = {}  # site -> its aggregate intensity summary (shared.ood)
        self._sent: dict[str, list[Message]] = {}
        self.current: dict = {}
        self.reset_round()

    # ---- per-round record -------------------------------------------------------------
    def reset_round(self) -> None:
        self.current = {
            "sites": {},
            "failed": [],
            "rejected": [],
            "refused": [],
            "missing": [],
            "aggregated": {},
            "nodes": {},
            "nodes_silent": {},
        }

    def global_round(self, server_round: int) -> int:
        return server_round + self.round_offset

    def _site(self, node_id: int) -> str:
        return self.identities.get(node_id) or self.site_of.get(node_id, f"node-{node_id}")

    def _identity_problem(self, node: int, claimed: str, taken: Mapping[str, int]) -> str | None:
        """Why a reply's site name cannot be believed, or None: a node whose key is registered to another
        site or to none, or a name another node already answered with this round."""
        if self.identities:
            registered = self.identities.get(node)
            if registered is None:
                return f"node {node} is not registered to any site"
            if claimed != registered:
                return f"node {node} reports site {claimed!r} but its key is registered to {registered!r}"
        if taken.get(claimed, node) != node:
            return f"site name {claimed!r} was already reported this round by node {taken[claimed]}"
        return None

    def _remember(self, phase: str, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self._sent[phase] = messages
        return messages

    def _sort_replies(self, phase: str, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Valid replies; errors and silent nodes are recorded by site name."""
        replies = list(replies)
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent.get(phase, [])}
        answered: set[int] = set()
        taken: dict[str, int] = {}  # site name -> the node that answered with it first
        valid = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in sent.values():  # SuperLink-made error (node unavailable): find the addressee
                node = sent.get(msg.metadata.reply_to_message_id, node)
            answered.add(node)
            if msg.has_error():
                reason = short_reason(msg.error.reason)
                named = re.match(r"(?:\w+: )?site ([A-Za-z0-9._-]+): ", reason)
                if named and node not in self.site_of:  # the ClientApp names its site in every error
                    self.site_of[node] = named.group(1)
                site = self._site(node)
                self.current["failed"].append({"site": site, "phase": phase, "reason": reason})
                log.warning("round %d %s: site %s failed: %s", self.global_round(server_round), phase, site, reason)
                continue
            claimed = str(msg.content["site"]["name"]) if "site" in msg.content.config_records else None
            if claimed is not None or self.identities:
                claimed = claimed or f"node-{node}"
                if problem := self._identity_problem(node, claimed, taken):
                    self.current["refused"].append(
                        {"site": claimed, "node_id": node, "phase": phase, "reason": problem}
                    )
                    log.warning(
                        "round %d %s: refused the reply of node %d: %s",
                        self.global_round(server_round),
                        phase,
                        node,
                        problem,
                    )
                    continue
                taken[claimed] = node
                self.site_of[node] = claimed
            self.current["nodes"][self._site(node)] = node
            valid.append(msg)
        for node in sorted(set(sent.values()) - answered):
            site = self._site(node)
            self.current["nodes_silent"][site] = node
            self.current["missing"].append({"site": site, "phase": phase})
            log.warning("round %d %s: no reply from site %s", self.global_round(server_round), phase, site)
        return valid

    def _site_metrics(self, msg: Message) -> dict:
        return {k: v for record in msg.content.metric_records.values() for k, v in record.items()}

    def pop_early_eval(self) -> dict:
        """``{"sites": {site: metrics}, "aggregated": metrics | None}``: the previous round's global model as
        evaluated by this round's train replies (eval-with-train); empty when there is none."""
        early, self.early_eval = self.early_eval, {}
        return early

    def _timing(self, msg: Message) -> dict:
        """When the ServerApp sent the message this reply answers, and when the reply arrived (wall clock)."""
        grid, sent_id = self._grid, msg.metadata.reply_to_message_id
        if grid is None or sent_id not in grid.arrived_at:
            return {}
        return {"time_sent": grid.sent_at.get(sent_id, float("nan")), "time_arrived": grid.arrived_at[sent_id]}

    def _take_early_eval(self, msg: Message) -> dict:
        """Remove the ``eval/`` metrics from a train reply (they must not be averaged as training metrics)."""
        found = {}
        for record in msg.content.metric_records.values():
            for key in [k for k in record if k.startswith(EARLY_EVAL_PREFIX)]:
                found[key[len(EARLY_EVAL_PREFIX) :]] = record[key]
                del record[key]
        return found

    # ---- Flower strategy hooks ----------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, *args, **kwargs):
        """Flower's round loop over a :class:`PollingGrid` (short reply polls, send/arrival times)."""
        self.num_rounds = num_rounds
        self._grid = grid if isinstance(grid, PollingGrid) else PollingGrid(grid, self.poll_interval)
        return super().start(self._grid, initial_arrays, num_rounds, *args, **kwargs)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.reset_round()
        config["global-round"] = self.global_round(server_round)
        # From round 2 the arrays are the previous round's aggregate: the site evaluates them first.
        config["evaluate-first"] = self.eval_with_train and server_round > 1
        return self._remember("train", super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["global-round"] = self.global_round(server_round)
        if self.eval_with_train and server_round < self.num_rounds:
            return self._remember("evaluate", [])  # the next round's train messages evaluate these arrays
        # A node that did not answer training this round is presumed down: don't wait for it again.
        silent = {self.current["nodes_silent"].get(m["site"]) for m in self.current["missing"] if m["phase"] == "train"}
        messages = [
            m
            for m in super().configure_evaluate(server_round, arrays, config, grid)
            if m.metadata.dst_node_id not in silent
        ]
        return self._remember("evaluate", messages)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[Message] = []
        early: dict[str, dict] = {}
        for msg in self._sort_replies("train", server_round, replies):
            site = self._site(msg.metadata.src_node_id)
            if evaluated := self._take_early_eval(msg):
                early[site] = {**evaluated, **self._timing(msg)}
            arrays = next(iter(msg.content.array_records.values()), None)
            metrics = {**self._site_metrics(msg), **self._timing(msg)}
            problem = "no parameters in the reply" if arrays is None else check_update(arrays, self.expected_shapes)
            if problem is None and not metrics.get("num-examples", 0) > 0:
                problem = "num-examples missing or not positive"
            if problem:
                self.current["rejected"].append({"site": site, "phase": "train", "reason": problem})
                log.warning(
                    "round %d: rejected update from site %s: %s", self.global_round(server_round), site, problem
                )
                continue
            self.current["sites"].setdefault(site, {})["train"] = metrics
            if OOD_RECORD in msg.content.config_records and (ref := site_from_metrics(dict(msg.content[OOD_RECORD]))):
                self.ood_refs[site] = ref
            accepted.append(msg)
        if early:
            contents = [
                RecordDict({"metrics": MetricRecord({k: v for k, v in m.items() if not k.startswith("time_")})})
                for m in early.values()
                if m.get("num-examples", 0) > 0
            ]
            aggregated = self.evaluate_metrics_aggr_fn(contents, self.weighted_by_key) if contents else None
            self.early_eval = {"sites": early, "aggregated": dict(aggregated) if aggregated is not None else None}
        min_sites = getattr(self, "min_train_nodes", 1)
        if len(accepted) < min_sites:
            log.warning(
                "round %d: %d valid update(s), fewer than min-sites=%d: global model kept",
                self.global_round(server_round),
                len(accepted),
                min_sites,
            )
            self.current["aggregated"]["train"] = None
            return None, None
        if self.fedbn and self.norm_keys:
            norm_parts = []
            for msg in accepted:
                key = next(iter(msg.content.array_records))
                full = msg.content[key]
                norm_parts.append(
                    RecordDict(
                        {
                            key: ArrayRecord({k: full[k] for k in full if k in self.norm_keys}),
                            "metrics": MetricRecord({"num-examples": self._site_metrics(msg)["num-examples"]}),
                        }
                    )
                )
                msg.content[key] = ArrayRecord({k: full[k] for k in full if k not in self.norm_keys})
            self.norm_state = aggregate_arrayrecords(norm_parts, self.weighted_by_key)
        # The global round: FedAdam's bias correction then continues across a resume as if never stopped.
        arrays, metrics = super().aggregate_train(self.global_round(server_round), accepted)
        self.current["aggregated"]["train"] = dict(metrics) if metrics is not None else None
        self.current["participants"] = sorted(self._site(m.metadata.src_node_id) for m in accepted)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = self._sort_replies("evaluate", server_round, replies)
        keys = None
        usable = []
        for msg in valid:
            metrics = self._site_metrics(msg)
            self.current["sites"].setdefault(self._site(msg.metadata.src_node_id), {})["eval"] = {
                **metrics,
                **self._timing(msg),
            }
            keys = keys or set(metrics)
            if set(metrics) == keys and metrics.get("num-examples", 0) > 0:
                usable.append(msg)
        metrics = super().aggregate_evaluate(server_round, usable) if usable else None
        self.current["aggregated"]["eval"] = dict(metrics) if metrics is not None else None
        return metrics

    # ---- server optimiser state (FedAdam's moments) for checkpoints ---------------------------
    def optimizer_state(self) -> dict[str, np.ndarray]:
        """FedAdam's first and second moments as ``m_t/<key>``, ``v_t/<key>``; empty for FedAvg/FedProx."""
        return {f"{name}/{k}": v for name in ("m_t", "v_t") for k, v in (getattr(self, name, None) or {}).items()}

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> list[str]:
        """Put saved moments back (resume); returns which were restored."""
        restored = []
        for name in ("m_t", "v_t"):
            part = {k.split("/", 1)[1]: np.asarray(v) for k, v in state.items() if k.startswith(f"{name}/")}
            if part and hasattr(self, name):
                setattr(self, name, part)
                restored.append(name)
        return restored


class SiteAwareFedAvg(SiteAwareStrategy, FedAvg):
    """FedAvg with per-site bookkeeping."""


class SiteAwareFedProx(SiteAwareStrategy, FedProx):
    """FedProx (clients add the proximal term) with per-site bookkeeping."""


class SiteAwareFedAdam(SiteAwareStrategy, FedAdam):
    """FedAdam with per-site bookkeeping."""


def build_strategy(cfg: RunConfig, **site_kwargs) -> SiteAwareStrategy:
    """The configured Flower strategy; every connected site is sampled, ``min-sites`` must answer."""
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=cfg.min_sites,
        min_evaluate_nodes=cfg.min_sites,
        min_available_nodes=cfg.min_sites,
        **site_kwargs,
    )
    if cfg.strategy == "fedprox":
        return SiteAwareFedProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.strategy == "fedadam":
        return SiteAwareFedAdam(eta=cfg.server_lr, **common)
    return SiteAwareFedAvg(**common)
