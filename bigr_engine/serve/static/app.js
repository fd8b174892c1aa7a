// The page of `bigr serve`: plain JavaScript against the JSON API (no build step).
"use strict";
const $ = (id) => document.getElementById(id);
let info = null;
let source = null;          // the image being inpainted (an Image element)
const mask = document.createElement("canvas");   // the mask at the image's own size
let drag = null;

async function post(path, body) {
  const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
  return data;
}

function number(id) {
  const v = $(id).value;
  return v === "" ? undefined : Number(v);
}

async function loadInfo() {
  info = await (await fetch("/v1/info")).json();
  const names = info.class_names.length ? info.class_names : [...Array(info.model.num_classes).keys()].map(String);
  names.forEach((name, i) => {
    const o = document.createElement("option");
    o.value = i; o.textContent = i + " " + name.split(",")[0];
    if (i < 2) o.selected = true;
    $("classes").appendChild(o);
  });
  if (info.text_to_image) {   // a text model: prompts instead of classes
    $("classes-label").hidden = true;
    $("prompt-label").hidden = false;
    $("per-label").textContent = "Per prompt";
  }
  const conditioning = info.text_to_image ? `text-to-image (${info.model.text_tokens} text tokens)`
                                          : `${info.model.num_classes} classes`;
  $("model").textContent = `${info.model.num_tokens} tokens of ${info.model.bits} bits, ${conditioning}, ` +
    `${info.tokenizer.img_size}x${info.tokenizer.img_size} images, on ${info.device}; defaults: cfg ${info.defaults.cfg}, ` +
    `${info.defaults.iters} iterations, ${info.defaults.steps} steps`;
}

function show(container, images) {
  container.innerHTML = "";
  for (const b64 of images) {
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + b64;
    img.addEventListener("click", () => useImage(img.src));
    container.appendChild(img);
  }
}

$("generate").addEventListener("click", async () => {
  const body = {seed: number("seed") ?? 0, per_class: number("per-class") ?? 1, cfg: number("cfg"),
                iters: number("iters")};
  if (info && info.text_to_image) {
    body.prompt = $("prompt").value.split("\n").map((s) => s.trim()).filter((s) => s.length > 0);
  } else {
    body.classes = [...$("classes").selectedOptions].map((o) => Number(o.value));
  }
  $("generate-status").textContent = "generating...";
  $("generate-status").className = "";
  try {
    const t = performance.now();
    const data = await post("/v1/generate", body);
    show($("images"), data.images);
    $("generate-status").textContent = `${data.images.length} images in ${((performance.now() - t) / 1000).toFixed(2)} s`;
  } catch (e) {
    $("generate-status").textContent = e.message;
    $("generate-status").className = "error";
  }
});

function useImage(src) {
  const img = new Image();
  img.onload = () => {
    source = img;
    mask.width = img.naturalWidth; mask.height = img.naturalHeight;
    const c = mask.getContext("2d");
    c.fillStyle = "black"; c.fillRect(0, 0, mask.width, mask.height);
    draw();
  };
  img.src = src;
}

function draw() {
  const canvas = $("canvas"), c = canvas.getContext("2d");
  c.imageSmoothingEnabled = false;
  c.clearRect(0, 0, canvas.width, canvas.height);
  if (!source) return;
  c.drawImage(source, 0, 0, canvas.width, canvas.height);
  c.globalAlpha = 0.5;
  c.drawImage(mask, 0, 0, canvas.width, canvas.height);
  c.globalAlpha = 1;
}

function toMask(e) {
  const r = $("canvas").getBoundingClientRect();
  return [(e.clientX - r.left) / r.width * mask.width, (e.clientY - r.top) / r.height * mask.height];
}

$("canvas").addEventListener("mousedown", (e) => { if (source) { drag = toMask(e); paint(e); } });
$("canvas").addEventListener("mousemove", (e) => { if (drag && $("tool").value === "brush") paint(e); });
window.addEventListener("mouseup", (e) => {
  if (drag && $("tool").value === "rect") {
    const [x0, y0] = drag, [x1, y1] = toMask(e);
    const c = mask.getContext("2d");
    c.fillStyle = "white";
    c.fillRect(Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0));
    draw();
  }
  drag = null;
});

function paint(e) {
  if ($("tool").value !== "brush") return;
  const [x, y] = toMask(e), c = mask.getContext("2d");
  c.fillStyle = "white";
  c.beginPath(); c.arc(x, y, Math.max(1, mask.width / 16), 0, 2 * Math.PI); c.fill();
  draw();
}

$("clear-mask").addEventListener("click", () => { if (source) useImage(source.src); });

$("upload").addEventListener("change", () => {
  const f = $("upload").files[0];
  if (!f) return;
  const reader = new FileReader();
  reader.onload = () => useImage(reader.result);
  reader.readAsDataURL(f);
});

$("inpaint").addEventListener("click", async () => {
  if (!source) { $("inpaint-status").textContent = "pick or load an image first"; return; }
  const img = document.createElement("canvas");
  img.width = source.naturalWidth; img.height = source.naturalHeight;
  img.getContext("2d").drawImage(source, 0, 0);
  $("inpaint-status").textContent = "inpainting...";
  $("inpaint-status").className = "";
  try {
    const data = await post("/v1/inpaint", {image: img.toDataURL("image/png"), mask: mask.toDataURL("image/png"),
                                            seed: number("seed") ?? 0, variations: 4});
    show($("inpaint-results"), data.images);
    $("inpaint-status").textContent = `${data.images.length} results`;
  } catch (e) {
    $("inpaint-status").textContent = e.message;
    $("inpaint-status").className = "error";
  }
});

loadInfo().catch((e) => { $("model").textContent = "cannot reach the server: " + e.message; });
