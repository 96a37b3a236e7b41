// Loads a UI-format workflow into a running ComfyUI's own frontend in headless chromium, queues it, waits for the run
// and takes a screenshot. Driven by tests/test_browser.py; prints one JSON object (the findings) on stdout, and
// leaves the assertions to the Python test.
//
//   node load_workflow.mjs --url http://127.0.0.1:PORT --workflow graph.json --screenshot out.png
//                          [--chromium /usr/bin/chromium] [--timeout-ms 240000] [--queue no]
//
// --queue no: load and screenshot only (a workflow whose model is not installed here).
//
// Before the real graph it loads a graph with an unknown node type and checks that the "missing nodes" dialog shows
// up, so that "no dialog" for the real graph means something.
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

function parseArgs(argv) {
  const args = { chromium: "/usr/bin/chromium", timeoutMs: 240000 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "").replace(/-(.)/g, (_, c) => c.toUpperCase());
    args[key] = argv[i + 1];
  }
  args.timeoutMs = Number(args.timeoutMs);
  for (const required of ["url", "workflow", "screenshot"]) {
    if (!args[required]) throw new Error(`missing --${required}`);
  }
  return args;
}

const MISSING_TEXTS = ["following node types were not found", "Some Nodes Are Missing"];

// In the page: is a missing-nodes warning showing? (the 2024 frontend's ComfyDialog, or the newer frontend's dialog)
function missingNodesShown(texts) {
  const body = document.body.innerText || "";
  const hit = texts.find((t) => body.includes(t));
  return { shown: Boolean(hit) || window.__missingNodesCalls.length > 0, calls: window.__missingNodesCalls, text: hit || null };
}

function closeDialogs() {
  const dialog = window.app?.ui?.dialog;
  if (dialog?.close) dialog.close();
  window.__missingNodesCalls.length = 0;
}

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
      id: n.id, type: n.type, pos: [...n.pos], size: [...n.size], collapsed: Boolean(n.flags?.collapsed),
      imageTop, images: (n.imgs ?? []).map((img) => img.naturalWidth), animated: Boolean(n.animatedImages),
    };
  });
}

// In the page: zoom and pan the canvas so that the whole graph shows, left of the 2024 frontend's floating menu.
function fitGraph() {
  const { app, LiteGraph } = window;
  const margin = 16;
  const menu = document.querySelector(".comfy-menu");
  const width = window.innerWidth - (menu ? menu.getBoundingClientRect().width + margin : 0);
  const height = window.innerHeight;
  let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
  for (const n of app.graph._nodes) {
    x0 = Math.min(x0, n.pos[0]);
    y0 = Math.min(y0, n.pos[1] - (LiteGraph?.NODE_TITLE_HEIGHT ?? 30));
    x1 = Math.max(x1, n.pos[0] + n.size[0]);
    y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const ds = app.canvas.ds;
  ds.scale = Math.min(1, (width - 2 * margin) / (x1 - x0), (height - 2 * margin) / (y1 - y0));
  ds.offset = [margin / ds.scale - x0, margin / ds.scale - y0];
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const workflow = JSON.parse(readFileSync(args.workflow, "utf8"));
  const findings = { consoleErrors: [], pageErrors: [] };
  const browser = await chromium.launch({
    executablePath: args.chromium,
    headless: true,
    // playwright gives the browser a fresh temporary profile itself (no --user-data-dir)
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1920, height: 1080 } });
    page.on("console", (msg) => { if (msg.type() === "error") findings.consoleErrors.push(msg.text()); });
    page.on("pageerror", (err) => findings.pageErrors.push(String(err)));
    await page.goto(args.url, { waitUntil: "load" });
    await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 60000 });
    findings.userAgent = await page.evaluate(() => navigator.userAgent);

    // Record every missing-nodes report, whatever the frontend shows for it.
    await page.evaluate(() => {
      window.__missingNodesCalls = [];
      const original = window.app.showMissingNodesError?.bind(window.app);
      window.app.showMissingNodesError = (types, ...rest) => {
        window.__missingNodesCalls.push(types.map((t) => (typeof t === "object" ? t.type : t)));
        return original?.(types, ...rest);
      };
    });

    // Control: an unknown node type must raise the warning.
    const bogus = structuredClone(workflow);
    bogus.nodes = [{ ...bogus.nodes[0], type: "L2VSDNoSuchNode", inputs: [], outputs: [] }];
    bogus.links = [];
    await page.evaluate((g) => window.app.loadGraphData(g), bogus);
    await page.waitForTimeout(500);
    findings.control = await page.evaluate(missingNodesShown, MISSING_TEXTS);
    findings.controlPageErrors = findings.pageErrors.splice(0);  // the bogus graph's own errors do not count
    await page.evaluate(closeDialogs);
    await page.keyboard.press("Escape");  // the newer frontend's dialogs close on Escape
    findings.controlClosed = await page.waitForFunction(
      (texts) => !texts.some((t) => (document.body.innerText || "").includes(t)), MISSING_TEXTS, { timeout: 5000 })
      .then(() => true, () => false);

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
    await page.evaluate(fitGraph);
    await page.waitForTimeout(500);
    await page.screenshot({ path: args.screenshot });
    findings.screenshot = args.screenshot;
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(findings) + "\n");
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
