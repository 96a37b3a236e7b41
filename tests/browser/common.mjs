// Helpers shared by the browser scripts (load_workflow.mjs, templates.mjs): arguments, the browser, and the
// missing-nodes warning of both frontends.
import { chromium } from "playwright-core";

// --some-flag value … → { someFlag: value }
export function parseArgs(argv, defaults, required) {
  const args = { chromium: "/usr/bin/chromium", ...defaults };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "").replace(/-(.)/g, (_, c) => c.toUpperCase());
    args[key] = argv[i + 1];
  }
  for (const name of required) {
    if (!args[name]) throw new Error(`missing --${name}`);
  }
  return args;
}

// Runs a script's main(), which returns its findings: they go to stdout as one JSON line; an error to stderr, exit 1.
export function runMain(main) {
  main().then(
    (findings) => process.stdout.write(JSON.stringify(findings) + "\n"),
    (err) => {
      process.stderr.write(`${err.stack || err}\n`);
      process.exit(1);
    });
}

// Debian's chromium, headless (playwright gives it a fresh temporary profile itself: no --user-data-dir).
export function launchBrowser(executablePath) {
  return chromium.launch({
    executablePath,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
}

// What each frontend shows for a missing node type: the 2024 frontend's dialog, an older Vue frontend's dialog, and
// the toast of frontend 1.5x ("Missing node: X" / "Missing nodes", "… uses a custom node that isn't installed …").
export const MISSING_TEXTS = ["following node types were not found", "Some Nodes Are Missing", "Missing node: ",
                              "custom node that isn't installed", "require missing node packs"];

// In the page: is a missing-nodes warning showing, or has the frontend reported one since the last closeDialogs?
export function missingNodesShown(texts) {
  const body = document.body.innerText || "";
  const hit = texts.find((t) => body.includes(t));
  return { shown: Boolean(hit) || window.__missingNodesCalls.length > 0, calls: window.__missingNodesCalls, text: hit || null };
}

export function closeDialogs() {
  const dialog = window.app?.ui?.dialog;
  if (dialog?.close) dialog.close();
  window.__missingNodesCalls.length = 0;
}

// In the page: record every missing-nodes report, whatever the frontend shows for it: the 2024 frontend calls
// app.showMissingNodesError; frontend 1.5x no longer does for a UI graph (it raises a toast and an error overlay), but
// both hand the missing types to the extensions' afterConfigureGraph hook.
export function hookMissingNodes() {
  window.__missingNodesCalls = [];
  const names = (types) => types.map((t) => (typeof t === "object" ? t.type : t));
  const original = window.app.showMissingNodesError?.bind(window.app);
  window.app.showMissingNodesError = (types, ...rest) => {
    window.__missingNodesCalls.push(names(types));
    return original?.(types, ...rest);
  };
  window.app.registerExtension({
    name: "L2VSD.Test.MissingNodes",
    afterConfigureGraph(types) {
      if (types?.length) window.__missingNodesCalls.push(names(types));
    },
  });
}

// Control: a graph with an unknown node type must raise the warning, so that "no warning" later means something.
// Returns { control, controlClosed, controlPageErrors }; the bogus graph's own page errors are taken out of
// `pageErrors`.
export async function missingNodesControl(page, workflow, pageErrors) {
  const bogus = structuredClone(workflow);
  bogus.nodes = [{ ...bogus.nodes[0], type: "L2VSDNoSuchNode", inputs: [], outputs: [] }];
  bogus.links = [];
  await page.evaluate((g) => window.app.loadGraphData(g), bogus);
  await page.waitForTimeout(500);
  const control = await page.evaluate(missingNodesShown, MISSING_TEXTS);
  const controlPageErrors = pageErrors.splice(0);
  await page.evaluate(closeDialogs);
  await page.keyboard.press("Escape");  // the newer frontend's dialogs close on Escape
  const dismiss = page.locator('[data-testid="error-overlay-dismiss"]');  // frontend 1.5x: its missing-node overlay
  if (await dismiss.count()) await dismiss.first().click({ timeout: 5000 }).catch(() => {});
  const controlClosed = await page.waitForFunction(
    (texts) => !texts.some((t) => (document.body.innerText || "").includes(t)), MISSING_TEXTS, { timeout: 5000 })
    .then(() => true, () => false);
  return { control, controlClosed, controlPageErrors };
}
