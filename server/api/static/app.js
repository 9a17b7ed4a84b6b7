// fedmri web page: upload a volume; show it in NiiVue (WebGL, three planes) with the label map as a
// translucent overlay, plus three server-rendered slices (the only view for a DICOM zip, or without WebGL2);
// list label colours and volumes, the OOD check and a download link.
// Plain browser APIs and NiiVue, vendored by scripts/vendor-niivue.sh: everything comes from this server.
"use strict";

const COLORS = { 1: [255, 196, 0], 2: [0, 170, 255], 3: [255, 40, 80] }; // GM, WM, lesion
const ALPHA = 0.45;
const DISPLAY_MM = 1.6; // screen pixels per mm
const NIIVUE_URL = "/static/vendor/niivue.umd.js";
const OVERLAY_OPACITY = 0.5;

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

// ---- NiiVue viewer -------------------------------------------------------------------------------------
// The bundle loads in the background when the page opens; a missing bundle or no WebGL2 leaves the
// server-rendered slices as the view (document.body.dataset.viewer says which, and why).

const niivueReady = new Promise((resolve) => {
  const script = document.createElement("script");
  script.src = NIIVUE_URL;
  script.onload = () => resolve(window.niivue || null);
  script.onerror = () => resolve(null);
  document.head.append(script);
});
let viewer = null; // one Niivue instance, reused for every upload

function hasWebGL2() {
  try {
    return !!document.createElement("canvas").getContext("webgl2");
  } catch (err) {
    return false;
  }
}

async function isZip(file) {
  const head = new Uint8Array(await file.slice(0, 4).arrayBuffer());
  return head[0] === 0x50 && head[1] === 0x4b && head[2] === 0x03 && head[3] === 0x04; // "PK\3\4"
}

function labelColormap(labels) {
  // Discrete lookup table: 0 transparent, the others in the legend's colours (shared/labels.py names).
  const ids = [0, ...labels.map((v) => v.label).filter((l) => l > 0)].sort((a, b) => a - b);
  const rgb = (l, k) => (l === 0 ? 0 : (COLORS[l] || [128, 128, 128])[k]);
  const names = Object.fromEntries(labels.map((v) => [v.label, v.name]));
  return {
    R: ids.map((l) => rgb(l, 0)), G: ids.map((l) => rgb(l, 1)), B: ids.map((l) => rgb(l, 2)),
    A: ids.map((l) => (l === 0 ? 0 : 255)), I: ids, labels: ids.map((l) => names[l] || (l === 0 ? "background" : `label ${l}`)),
  };
}

function setSliceType(name) {
  if (!viewer) return;
  const types = window.niivue.SLICE_TYPE;
  viewer.setSliceType({ multiplanar: types.MULTIPLANAR, axial: types.AXIAL, coronal: types.CORONAL,
                        sagittal: types.SAGITTAL }[name]);
  for (const b of document.querySelectorAll("#viewer [data-slice]")) b.classList.toggle("active", b.dataset.slice === name);
}

function useSlices(reason) {
  $("viewer").hidden = true;
  $("views-caption").hidden = true;
  document.querySelector(".views").classList.remove("compact");
  document.body.dataset.viewer = "slices";
  document.body.dataset.viewerReason = reason;
}

async function showViewer(file, segmentation, labels) {
  // A NIfTI upload: the browser has the file, NiiVue reads it directly; the label map comes from the
  // same response. A DICOM zip is not something NiiVue can open: the server slices are its view.
  if (await isZip(file)) return useSlices("DICOM series: server-rendered slices");
  const nv = await niivueReady;
  if (!nv) return useSlices("NiiVue bundle not available (run scripts/vendor-niivue.sh)");
  if (!hasWebGL2()) return useSlices("no WebGL2 in this browser");
  try {
    $("viewer").hidden = false; // laid out before NiiVue measures the canvas
    $("views-caption").hidden = false;
    document.querySelector(".views").classList.add("compact"); // the slices stay, smaller, under the viewer
    if (!viewer) {
      viewer = new nv.Niivue({
        backColor: [0, 0, 0, 1], crosshairColor: [0.2, 0.9, 0.3, 0.8], crosshairWidth: 0.25, dragAndDropEnabled: false, isColorbar: false,
        multiplanarShowRender: nv.SHOW_RENDER.NEVER, show3Dcrosshair: false, loadingText: "",
      });
      await viewer.attachToCanvas($("niivue"));
      viewer.setInterpolation(true); // nearest neighbour: label edges stay on voxel boundaries
      viewer.onLocationChange = (data) => { $("location").textContent = data.string; };
      window.fedmriViewer = viewer; // for the browser test and the console
    }
    while (viewer.volumes.length) viewer.removeVolumeByIndex(viewer.volumes.length - 1);
    // Neutral names: NiiVue picks the reader by extension, and the patient's file name is not shown.
    const name = /\.nii$/i.test(file.name) ? "upload.nii" : "upload.nii.gz";
    const image = await nv.NVImage.loadFromFile({ file: new File([file], name), name });
    const overlay = await nv.NVImage.loadFromFile({
      file: new File([segmentation], "segmentation.nii.gz"), name: "segmentation.nii.gz",
      opacity: Number($("overlay-opacity").value) || OVERLAY_OPACITY,
    });
    overlay.setColormapLabel(labelColormap(labels));
    viewer.addVolume(image);
    viewer.addVolume(overlay);
    viewer.updateGLVolume();
    setSliceType("multiplanar");
    viewer.resizeListener();
    document.body.dataset.viewer = "niivue";
    document.body.dataset.viewerReason = "";
  } catch (err) {
    useSlices("viewer failed: " + err.message);
  }
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
    await showViewer(file, decode(result.preview.segmentation_nii_gz), result.labels);
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
$("overlay-opacity").addEventListener("input", (e) => {
  if (viewer && viewer.volumes.length > 1) viewer.setOpacity(1, Number(e.target.value));
});
for (const button of document.querySelectorAll("#viewer [data-slice]")) {
  button.addEventListener("click", () => setSliceType(button.dataset.slice));
}
loadModels();
