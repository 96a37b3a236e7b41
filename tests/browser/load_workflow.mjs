// Loads a UI-format workflow into a running ComfyUI's own frontend in headless chromium, queues it, waits for the run
// and takes a screenshot. Driven by tests/test_browser.py; prints one JSON object (the findings) on stdout, and
// leaves the assertions to the Python test.
//
//   node load_workflow.mjs --url http://127.0.0.1:PORT --workflow graph.json --screenshot out.png
//                          [--chromium /usr/bin/chromium] [--timeout-ms 240000] [--queue no]
//
// --queue no: load and screenshot only (a workflow whose model is not installed here).
// --preview3d-screenshot out3d.png: after the run, a screenshot of the (first) core Preview3D node at scale 1, once
// its 3D viewer has fetched the model (the current frontend; findings.preview3d says what the viewer got).
//
// Before the real graph it loads a graph with an unknown node type and checks that the "missing nodes" dialog shows
// up, so that "no dialog" for the real graph means something.
import { readFileSync } from "node:fs";
import { hookMissingNodes, launchBrowser, missingNodesControl, missingNodesShown, MISSING_TEXTS,
         parseArgs, runMain } from "./common.mjs";

// In the page: where each node is and what it shows — pos, size, collapsed, the top of its image area (the
// frontend's own rule: below the last widget), its images' natural widths and whether it plays an animation.
function nodeGeometry() {
  const { app, LiteGraph } = window;
  const widgetHeight = LiteGraph?.NODE_WIDGET_HEIGHT ?? 20;
  return app.graph._nodes.map((n) => {
    const widgets = n.widgets ?? [];
    let imageTop = n.computeSize()[1];
    const last = widgets[widgets.length - 1];
    if (last && last.last_y != null) {
      const height = last.computeSize ? last.computeSize(n.size[0])[1] + 4 : (last.computedHeight ?? widgetHeight + 4);
      imageTop = Math.max(imageTop, last.last_y + height);
    }
    return {
      // frontend 1.5x keeps node ids as strings
      id: Number(n.id), type: n.type, pos: [...n.pos], size: [...n.size], collapsed: Boolean(n.flags?.collapsed),
      imageTop, images: (n.imgs ?? []).map((img) => img.naturalWidth), animated: Boolean(n.animatedImages),
      outputImages: app.nodeOutputs?.[String(n.id)]?.images?.length ?? 0,  // what the run's `executed` gave it
    };
  });
}

// In the page: the part of the canvas that no panel covers, {left, top, right, bottom} in page pixels: left of the
// 2024 frontend's floating menu; right of the current frontend's side toolbar, below its tabs and action bar, above
// its canvas controls (bottom right).
function freeArea() {
  const visible = (selector) => [...document.querySelectorAll(selector)].map((e) => e.getBoundingClientRect())
    .filter((r) => r.width > 0 && r.height > 0);
  const area = { left: 0, top: 0, right: window.innerWidth, bottom: window.innerHeight };
  for (const r of visible(".comfy-menu")) area.right = Math.min(area.right, window.innerWidth - r.width - 16);
  for (const r of visible(".side-tool-bar-container")) area.left = Math.max(area.left, r.right);
  for (const r of visible('[data-testid="topbar-workflow-tabs"], [data-testid="top-menu-actionbars"]')) {
    area.top = Math.max(area.top, r.bottom);
  }
  for (const r of visible('button[aria-label^="Fit View"]')) area.bottom = Math.min(area.bottom, r.top);
  return area;
}

// In the page: zoom and pan the canvas so that the whole graph shows in `area` (freeArea()).
function fitGraph(area) {
  const { app, LiteGraph } = window;
  const margin = 16;
  const width = area.right - area.left;
  const height = area.bottom - area.top;
  let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
  for (const n of app.graph._nodes) {
    x0 = Math.min(x0, n.pos[0]);
    y0 = Math.min(y0, n.pos[1] - (LiteGraph?.NODE_TITLE_HEIGHT ?? 30));
    x1 = Math.max(x1, n.pos[0] + n.size[0]);
    y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const ds = app.canvas.ds;
  const box = app.canvas.canvas.getBoundingClientRect();
  ds.scale = Math.min(1, (width - 2 * margin) / (x1 - x0), (height - 2 * margin) / (y1 - y0));
  ds.offset = [(area.left - box.left + margin) / ds.scale - x0, (area.top - box.top + margin) / ds.scale - y0];
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
}

// In the page: the first Preview3D node at scale 1, its top left corner (title bar included) at `area`'s top left
// (plus a margin); returns its rectangle on the page, the model_file its widget holds and the canvases inside it.
function showPreview3D(area) {
  const { app, LiteGraph } = window;
  const node = app.graph._nodes.find((n) => n.type === "Preview3D");
  if (!node) return null;
  const title = LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  const margin = 16;
  const ds = app.canvas.ds;
  const box = app.canvas.canvas.getBoundingClientRect();
  const rect = { x: area.left + margin, y: area.top + margin, width: node.size[0], height: node.size[1] + title };
  ds.scale = 1;
  ds.offset = [rect.x - box.left - node.pos[0], rect.y - box.top + title - node.pos[1]];
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  // the viewer's canvas: a canvas (not the graph's, not the minimap's) inside the node; its rectangle relative to the
  // node's
  const viewerCanvases = [...document.querySelectorAll("canvas")].map((c) => [c, c.getBoundingClientRect()])
    .filter(([c, r]) => c !== app.canvas.canvas && r.width > 0 && r.left >= rect.x - 1 && r.top >= rect.y - 1
      && r.right <= rect.x + rect.width + 1 && r.bottom <= rect.y + rect.height + 1)
    .map(([, r]) => ({ x: r.left - rect.x, y: r.top - rect.y, width: r.width, height: r.height }));
  const modelFile = node.widgets?.find((w) => w.name === "model_file")?.value ?? null;
  return { rect, viewerCanvases, modelFile };
}

async function main() {
  const args = parseArgs(process.argv.slice(2), { timeoutMs: 240000 }, ["url", "workflow", "screenshot"]);
  args.timeoutMs = Number(args.timeoutMs);
  const workflow = JSON.parse(readFileSync(args.workflow, "utf8"));
  const findings = { consoleErrors: [], pageErrors: [] };
  const browser = await launchBrowser(args.chromium);
  try {
    const page = await browser.newPage({ viewport: { width: 1920, height: 1080 } });
    page.on("console", (msg) => { if (msg.type() === "error") findings.consoleErrors.push(msg.text()); });
    page.on("pageerror", (err) => findings.pageErrors.push(String(err)));
    const modelRequests = [];  // what the 3D viewer fetched (GET /view?filename=….glb)
    page.on("response", (r) => { if (/\/view\?.*\.glb/.test(r.url())) modelRequests.push({ url: r.url(), status: r.status() }); });
    await page.goto(args.url, { waitUntil: "load" });
    await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 60000 });
    findings.userAgent = await page.evaluate(() => navigator.userAgent);
    await page.evaluate(hookMissingNodes);
    Object.assign(findings, await missingNodesControl(page, workflow, findings.pageErrors));

    // The real workflow.
    await page.evaluate((g) => window.app.loadGraphData(g), workflow);
    await page.waitForTimeout(500);
    findings.missing = await page.evaluate(missingNodesShown, MISSING_TEXTS);
    findings.loadedTypes = await page.evaluate(() => window.app.graph._nodes.map((n) => n.type));
    await page.evaluate(() => window.app.canvas.draw(true, true));  // widgets learn their place when drawn
    findings.nodesLoaded = await page.evaluate(nodeGeometry);
    // What the frontend would queue for it (API format), to compare with the workflow's API twin.
    findings.apiPrompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);

    if (args.queue !== "no") {
    const before = new Set(Object.keys(await page.evaluate(() => fetch("/history").then((r) => r.json()))));
    await page.evaluate(() => window.app.queuePrompt(0, 1));
    findings.nodeErrors = await page.evaluate(() => window.app.lastNodeErrors ?? null);

    // Wait for the new history entry to finish (success or error).
    const deadline = Date.now() + args.timeoutMs;
    findings.promptId = null;
    findings.status = null;
    while (Date.now() < deadline) {
      const history = await page.evaluate(() => fetch("/history").then((r) => r.json()));
      const fresh = Object.keys(history).filter((id) => !before.has(id));
      if (fresh.length) {
        findings.promptId = fresh[0];
        const status = history[fresh[0]].status;
        if (status && (status.completed || status.status_str === "error")) {
          findings.status = status.status_str;
          findings.outputs = Object.keys(history[fresh[0]].outputs || {});
          break;
        }
      } else if (findings.nodeErrors && Object.keys(findings.nodeErrors).length) {
        break;  // refused at validation: nothing will run
      }
      await page.waitForTimeout(1000);
    }
    // Let the preview images arrive in the nodes before the screenshot.
    await page.waitForFunction(
      () => window.app.graph._nodes.filter((n) => n.type === "PreviewImage").every((n) => n.imgs?.every((i) => i.complete)),
      null, { timeout: 15000 }).catch(() => {});
    findings.previewImages = await page.evaluate(
      () => window.app.graph._nodes.filter((n) => n.type === "PreviewImage").map((n) => n.imgs?.length ?? 0));
    // the nodes' own images arrive too (the optimizer's orbit renders, Export Mesh's turntable)
    await page.waitForFunction(
      () => window.app.graph._nodes.filter((n) => n.type.startsWith("L2VSD_") && window.app.nodeOutputs?.[n.id]?.images)
        .every((n) => n.imgs?.length && n.imgs.every((i) => i.complete)),
      null, { timeout: 15000 }).catch(() => {});
    await page.evaluate(() => window.app.canvas.draw(true, true));
    findings.nodesAfterRun = await page.evaluate(nodeGeometry);
    }  // queue
    const area = await page.evaluate(freeArea);
    await page.evaluate(fitGraph, area);
    await page.waitForTimeout(500);
    await page.screenshot({ path: args.screenshot });
    findings.screenshot = args.screenshot;

    if (args.preview3dScreenshot) {
      // the viewer fetches the model once the run's output reaches the node; then it needs a moment to draw it
      const deadline = Date.now() + 30000;
      while (Date.now() < deadline && !modelRequests.some((r) => r.status === 200)) await page.waitForTimeout(250);
      await page.evaluate(showPreview3D, area);
      await page.waitForTimeout(3000);  // the DOM widget follows the canvas, the renderer resizes and draws
      findings.preview3d = await page.evaluate(showPreview3D, area);
      if (findings.preview3d) {
        findings.preview3d.modelRequests = modelRequests;
        await page.mouse.move(0, 0);
        await page.screenshot({ path: args.preview3dScreenshot, clip: findings.preview3d.rect });
      }
    }
  } finally {
    await browser.close();
  }
  return findings;
}

runMain(main);
