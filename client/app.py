"""fedmri ClientApp: one hospital trains and evaluates the global model on its own data.

Thin, per Flower's app template: the work is in ``client/task.py``. In a simulation (node config
``partition-id``) the task runs in this process, a warm Ray actor. In a deployment (node config
``data-dir``) Flower starts a fresh ClientApp process per message, so this module imports neither
torch nor MONAI (from ``shared`` only the small ``shared.wire``): it hands the message to the site's warm worker process
(``client/worker.py``, started on first use) and returns its answer, or does the work itself when
the worker cannot be reached (run config ``warm-worker = false`` always does).
"""

from __future__ import annotations

# isort: off
from client import timing  # first: marks when this module's imports begin (bench/bench_native.py)

# isort: on
import logging
import os
import time

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client import worker
from shared.wire import is_packed, pack_content, unpack_content

timing.imports_done()
app = ClientApp()
log = logging.getLogger(__name__)

# Phases the task measures itself; the rest of a worker message's time is the hand-off (time_handoff).
_TASK_LAPS = ("time_data", "time_eval", "time_train", "time_serialize")


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training cases (``client.task.train``)."""
    return Message(content=_handle("train", msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Dice (and HD95 when configured) of the global model on the site's validation cases."""
    return Message(content=_handle("evaluate", msg.content, context), reply_to=msg)


def _flag(value) -> bool:
    return value.lower() == "true" if isinstance(value, str) else bool(value)


def _in_process(kind: str, content: RecordDict, context: Context) -> RecordDict:
    from client import task  # torch, MONAI, shared: imported on first use only

    return (task.train if kind == "train" else task.evaluate_global)(content, context)


def _handle(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """The task's reply to ``content``, its model in the form the server sent (``shared.wire``: fedmri's
    ServerApp packs; a stock Flower ServerApp that does not gets ordinary records back)."""
    packed = any(is_packed(record) for record in content.array_records.values())
    reply = _dispatch(kind, unpack_content(content), context)
    return pack_content(reply) if packed else reply


def _dispatch(kind: str, content: RecordDict, context: Context) -> RecordDict:
    if "data-dir" not in context.node_config:  # simulation (or a node config the task rejects, with its reason)
        return _in_process(kind, content, context)
    entered = time.time()
    info = {"pid": os.getpid(), "messages": 1, "started": 0, "fallback": 0}
    if not _flag(context.run_config.get("warm-worker", True)):
        reply = _in_process(kind, content, context)
    else:
        idle = float(context.run_config.get("worker-idle-timeout", worker.DEFAULT_IDLE_TIMEOUT))
        try:
            reply, state, got = worker.call(kind, content, context, idle_timeout=idle)
        except worker.WorkerUnavailable as exc:
            site = context.node_config.get("site", "")
            log.warning("site %s: worker unavailable (%s); doing the work in this ClientApp process", site, exc)
            reply, info["fallback"] = _in_process(kind, content, context), 1
        else:
            context.state = state  # Flower stores the context this process was handed
            info.update(got)
            metrics, done = reply["metrics"], time.time()
            work = sum(float(metrics.get(k, 0.0)) for k in _TASK_LAPS)
            metrics.update(
                {
                    **timing.process_marks(entered),  # this process's start-up and imports, not the worker's
                    "time_handoff": max(0.0, done - entered - work),  # connect (or start), send, receive
                    "time_reply": done,
                }
            )
    reply["metrics"].setdefault("time_handoff", 0.0)  # every site's replies carry the same keys
    reply["metrics"].update({f"worker_{k}": int(v) for k, v in info.items()})
    return reply
