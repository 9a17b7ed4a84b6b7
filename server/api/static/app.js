// fedmri web page: upload a volume, draw three slices with the label overlay, list volumes.
// Plain browser APIs only (fetch, FormData, canvas); everything comes from this server.
"use strict";

const COLORS = { 1: [255, 196, 0], 2: [0, 170, 255], 3: [255, 40, 80] }; // GM, WM, lesion
const ALPHA = 0.45;
const DISPLAY_MM = 1.6; // screen pixels per mm

const $ = (id) => document.getElementById(id);

function apiHeaders() {
  const key = $("api-key").value.trim();
  sessionStorage.setItem("fedmri-api-key", key);
  return key ? { "X-API-Key": key } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function decode(b64) {
  const raw = atob(b64);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

function drawSlice(slice) {
  const canvas = $("view-" + slice.plane);
  canvas.width = slice.width;
  canvas.height = slice.height;
  canvas.style.width = Math.round(slice.width * slice.pixel_mm[0] * DISPLAY_MM) + "px";
  canvas.style.height = Math.round(slice.height * slice.pixel_mm[1] * DISPLAY_MM) + "px";
  const image = decode(slice.image);
  const labels = decode(slice.labels);
  const ctx = canvas.getContext("2d");
  const pixels = ctx.createImageData(slice.width, slice.height);
  let overlaid = 0;
  for (let i = 0; i < image.length; i++) {
    let r = image[i], g = image[i], b = image[i];
    const color = COLORS[labels[i]];
    if (color) {
      r = (1 - ALPHA) * r + ALPHA * color[0];
      g = (1 - ALPHA) * g + ALPHA * color[1];
      b = (1 - ALPHA) * b + ALPHA * color[2];
      overlaid++;
    }
    pixels.data.set([r, g, b, 255], 4 * i);
  }
  ctx.putImageData(pixels, 0, 0);
  canvas.dataset.overlayPixels = String(overlaid);
}

function showVolumes(result) {
  const body = $("volumes").querySelector("tbody");
  body.replaceChildren();
  for (const v of result.labels) {
    const row = body.insertRow();
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${(COLORS[v.label] || [128, 128, 128]).join(",")})`;
    row.insertCell().append(swatch);
    row.insertCell().textContent = v.name;
    const ml = row.insertCell();
    ml.className = "ml";
    ml.textContent = v.ml.toFixed(1);
  }
  const input = result.input;
  const facts = {
    model: result.model_version,
    shape: input.shape.join(" × "),
    "voxel size": input.spacing_mm.map((s) => s.toFixed(2)).join(" × ") + " mm",
    orientation: input.orientation + ` (NIfTI-${input.nifti_version}, qform ${input.qform_code}, sform ${input.sform_code})`,
    time: result.timings.total_s.toFixed(2) + " s",
  };
  const dl = $("summary");
  dl.replaceChildren();
  for (const [k, v] of Object.entries(facts)) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dl.append(dt, dd);
  }
  const link = $("download");
  if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([decode(result.preview.segmentation_nii_gz)], { type: "application/gzip" }));
}

function showOod(ood) {
  // Out-of-distribution check (shared/ood.py): a warning when the scan is unlike every training site.
  const box = $("ood");
  box.hidden = !ood;
  if (!ood) return;
  const expected = ood.expected_tissue_dice == null ? "" : `; expected grey/white matter Dice ${ood.expected_tissue_dice.toFixed(2)}`;
  box.className = ood.warning ? "warning" : "ok";
  box.textContent = ood.warning
    ? `Warning: this scan's intensities are unlike every training site (score ${ood.score.toFixed(2)} > ${ood.threshold.toFixed(2)}, ` +
      `nearest ${ood.nearest_site}${expected}). The segmentation may be worse than usual.`
    : `Intensities like the training sites' (score ${ood.score.toFixed(2)} ≤ ${ood.threshold.toFixed(2)}, nearest ${ood.nearest_site}${expected}).`;
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: apiHeaders() });
    if (!response.ok) return;
    const select = $("model");
    const current = select.value;
    select.replaceChildren(new Option("served model", ""));
    for (const m of (await response.json()).models) {
      select.append(new Option(`${m.version}${m.served ? " (served)" : ""}`, m.version));
    }
    select.value = current;
  } catch (err) {
    // The list is a convenience; segmenting works without it.
  }
}

async function segment(event) {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) return setStatus("Choose a .nii or .nii.gz file, or a DICOM series as .zip, first.", true);
  const form = new FormData();
  form.append("file", file);
  const params = new URLSearchParams({ preview: "true" });
  if ($("model").value) params.set("model", $("model").value);
  $("submit").disabled = true;
  setStatus("Uploading and segmenting…");
  document.body.dataset.state = "busy";
  try {
    const response = await fetch("/v1/segment/summary?" + params, { method: "POST", body: form, headers: apiHeaders() });
    const result = await response.json();
    if (!response.ok) throw new Error(`${response.status}: ${result.detail}`);
    result.preview.slices.forEach(drawSlice);
    showVolumes(result);
    showOod(result.ood);
    $("result").hidden = false;
    setStatus("Done.");
    document.body.dataset.state = "done";
  } catch (err) {
    setStatus("Failed — " + err.message, true);
    document.body.dataset.state = "error";
  } finally {
    $("submit").disabled = false;
  }
}

$("api-key").value = sessionStorage.getItem("fedmri-api-key") || "";
$("api-key").addEventListener("change", loadModels);
$("upload-form").addEventListener("submit", segment);
loadModels();
