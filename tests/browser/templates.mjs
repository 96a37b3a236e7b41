// Opens a current ComfyUI frontend's Templates panel in headless chromium, goes to Extensions → the pack, records the
// cards it lists and their thumbnails, takes a screenshot of the list, then opens every listed template from the panel
// (a click on its card, as a user does) and records what the frontend loaded. Driven by tests/test_browser.py; prints
// one JSON object (the findings) on stdout and leaves the assertions to the Python test.
//
//   node templates.mjs --url http://127.0.0.1:PORT --pack ComfyUI-L2VSD --expect a,b,c --screenshot list.png
//                      [--chromium /usr/bin/chromium]
//
// --expect: the template names the test expects, only to know when the list has settled (the findings report what
// was listed). After the templates it loads a graph with an unknown node type and checks that the missing-nodes hook
// fires, so that "no missing nodes" for the templates means something.
import { hookMissingNodes, launchBrowser, missingNodesControl, missingNodesShown, MISSING_TEXTS,
         parseArgs, runMain } from "./common.mjs";

const CARD = '[data-testid="template-workflows-content"] [data-testid^="template-workflow-"]';
const CARD_PREFIX = "template-workflow-";

// The Templates panel, showing the pack's templates (Extensions → pack).
async function openPackTemplates(page, pack, expected) {
  await page.locator(".templates-tab-button").first().click();
  await page.locator('[data-testid="template-workflows-content"]').waitFor({ timeout: 20000 });
  await page.getByRole("button", { name: pack, exact: true }).click({ timeout: 20000 });
  // settled: the cards are exactly the expected ones (or, after 15 s, whatever is there)
  await page.waitForFunction(({ selector, prefix, names }) => {
    const shown = [...document.querySelectorAll(selector)].map((c) => c.dataset.testid.slice(prefix.length));
    return shown.length === names.length && names.every((n) => shown.includes(n));
  }, { selector: CARD, prefix: CARD_PREFIX, names: expected }, { timeout: 15000 }).catch(() => {});
}

// In the page: the listed cards, each with its title and thumbnail (the <img> in the card's thumbnail; a thumbnail
// that failed to load is replaced by the frontend's default picture, without "thumbnail-content").
function listedCards({ selector, prefix }) {
  return [...document.querySelectorAll(selector)].map((card) => {
    const img = card.querySelector('[data-testid="thumbnail-content"] img');
    return {
      name: card.dataset.testid.slice(prefix.length),
      title: card.querySelector("h3")?.textContent.trim() ?? null,
      thumbnail: img ? { src: img.currentSrc || img.src, complete: img.complete, naturalWidth: img.naturalWidth,
                         naturalHeight: img.naturalHeight } : null,
      fallback: Boolean([...card.querySelectorAll("img")].find((i) => i.src.includes("default-template"))),
    };
  });
}

// In the page: the graph that is open now.
function openGraph() {
  const graph = window.app.graph.serialize();
  return {
    types: graph.nodes.map((n) => n.type),
    links: (graph.links ?? []).length,
    workflow: window.app.extensionManager?.workflow?.activeWorkflow?.filename ?? null,
  };
}

async function main() {
  const args = parseArgs(process.argv.slice(2), {}, ["url", "pack", "expect", "screenshot"]);
  const expected = args.expect.split(",").filter(Boolean);
  const findings = { consoleErrors: [], templateWarnings: [], pageErrors: [], responses: [], failedRequests: [] };
  const browser = await launchBrowser(args.chromium);
  try {
    const page = await browser.newPage({ viewport: { width: 1920, height: 1080 } });
    page.on("console", (msg) => {
      if (msg.type() === "error") findings.consoleErrors.push(msg.text());
      // the frontend reports a template it cannot fetch or validate on the console (reportError)
      if (/workflow_template/.test(msg.text()) && ["error", "warning"].includes(msg.type())) {
        findings.templateWarnings.push(msg.text());
      }
    });
    page.on("pageerror", (err) => findings.pageErrors.push(String(err)));
    page.on("response", (r) => {
      if (r.url().includes("/workflow_templates")) {
        findings.responses.push({ url: r.url(), status: r.status(), contentType: r.headers()["content-type"] ?? null });
      }
    });
    page.on("requestfailed", (r) => {
      if (r.url().includes("/workflow_templates")) findings.failedRequests.push({ url: r.url(), error: r.failure()?.errorText });
    });
    const started = Date.now();
    await page.goto(args.url, { waitUntil: "load" });
    await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 60000 });
    await page.evaluate(hookMissingNodes);
    // every graph load, with the workflow name it opens under (a template opens under its name)
    await page.evaluate(() => {
      window.__graphLoads = [];
      const original = window.app.loadGraphData.bind(window.app);
      window.app.loadGraphData = async (...a) => {
        const result = await original(...a);
        const name = typeof a[3] === "string" ? a[3] : (a[3]?.filename ?? null);
        window.__graphLoads.push({ name, loaded: result !== false && result !== undefined });
        return result;
      };
    });

    // The list, its thumbnails and a screenshot of it (without the warning overlay of the first-run default graph,
    // which names models that are not installed here).
    const dismiss = page.locator('[data-testid="error-overlay-dismiss"]');
    if (await dismiss.count()) await dismiss.first().click({ timeout: 5000 }).catch(() => {});
    await openPackTemplates(page, args.pack, expected);
    await page.waitForFunction(({ selector }) => [...document.querySelectorAll(selector)].every((card) =>
      [...card.querySelectorAll("img")].every((i) => i.complete)), { selector: CARD }, { timeout: 15000 })
      .catch(() => {});
    await page.mouse.move(0, 0);  // no card hovered (it zooms) in the screenshot
    await page.waitForTimeout(1000);  // the cards' transitions
    findings.listed = await page.evaluate(listedCards, { selector: CARD, prefix: CARD_PREFIX });
    findings.pageTitle = await page.evaluate(() => [...document.querySelectorAll("h2")].map((h) => h.textContent.trim()));
    await page.screenshot({ path: args.screenshot });
    findings.listedAfterMs = Date.now() - started;

    // Each template, opened from the panel.
    findings.opened = {};
    for (const [i, { name }] of findings.listed.entries()) {
      if (i > 0) await openPackTemplates(page, args.pack, expected);
      await page.evaluate(() => { window.__missingNodesCalls.length = 0; });
      const loadsBefore = await page.evaluate(() => window.__graphLoads.length);
      await page.locator(`${CARD}[data-testid="${CARD_PREFIX}${name}"]`).click();
      const loaded = await page.waitForFunction((n) => window.__graphLoads.length > n, loadsBefore, { timeout: 20000 })
        .then(() => true, () => false);
      const panelClosed = await page.locator('[data-testid="template-workflows-content"]')
        .waitFor({ state: "detached", timeout: 10000 }).then(() => true, () => false);
      await page.waitForTimeout(300);
      findings.opened[name] = {
        loaded, panelClosed,
        loads: await page.evaluate((n) => window.__graphLoads.slice(n), loadsBefore),
        missing: await page.evaluate(missingNodesShown, MISSING_TEXTS),
        ...(await page.evaluate(openGraph)),
      };
    }
    findings.openedAfterMs = Date.now() - started;

    // Control: an unknown node type fires the missing-nodes hook (the first template with a bogus node).
    const first = findings.listed[0]?.name ?? expected[0];
    const workflow = await page.evaluate(
      ({ pack, name }) => fetch(`/api/workflow_templates/${pack}/${name}.json`).then((r) => r.json()),
      { pack: args.pack, name: first });
    Object.assign(findings, await missingNodesControl(page, workflow, findings.pageErrors));
  } finally {
    await browser.close();
  }
  return findings;
}

runMain(main);
