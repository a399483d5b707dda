// The browser page end to end, in headless Chromium (Debian's package) driven by playwright-core:
// upload an image and watch it finish over the WebSocket, open the result, generate a PDF from
// the form, all without console errors; then check the layout at phone width.
//
// Needs a built offload binary (OFFLOAD_BIN, default target/debug/offload) and /usr/bin/chromium
// (CHROMIUM to override). Run: npm test (scripts/test.sh does it after cargo test).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { deflateSync } from "node:zlib";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "../..");
const bin = process.env.OFFLOAD_BIN || join(root, "target/debug/offload");
const shots = join(here, "screenshots");

let server;
let base;
let keyed; // a second server, with API keys
const dataDirs = []; // removed at the end
let browser;

/** A w×h PNG: red left half, blue right half. */
function png(w, h) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => {
    let c = 0xffffffff;
    for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const body = Buffer.concat([Buffer.from(type), data]);
    const sum = Buffer.alloc(4);
    sum.writeUInt32BE(crc(body));
    return Buffer.concat([len, body, sum]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0);
  ihdr.writeUInt32BE(h, 4);
  ihdr.set([8, 2, 0, 0, 0], 8);
  const raw = Buffer.alloc((w * 3 + 1) * h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const at = y * (w * 3 + 1) + 1 + x * 3;
      raw.set(x < w / 2 ? [220, 20, 20] : [20, 20, 220], at);
    }
  }
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", deflateSync(raw)),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}

/** Starts offload with `args` on a fresh data directory; resolves to [process, base URL]. */
async function startServer(args = []) {
  // The page runs against the default, durable store, in a data directory of its own.
  const dataDir = mkdtempSync(join(tmpdir(), "offload-browser-"));
  dataDirs.push(dataDir);
  const child = spawn(bin, ["--bind", "127.0.0.1:0", "--static-dir", join(root, "static"), "--data-dir", dataDir, ...args], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  const url = await new Promise((resolveBase, reject) => {
    const timer = setTimeout(() => reject(new Error("offload did not log its address")), 20000);
    let seen = "";
    child.stdout.on("data", (chunk) => {
      seen += chunk;
      const m = seen.match(/listening on (http:\/\/\S+)/);
      if (m) {
        clearTimeout(timer);
        resolveBase(m[1]);
      }
    });
    child.on("exit", (code) => reject(new Error(`offload exited with ${code}`)));
  });
  return [child, url];
}

before(async () => {
  [server, base] = await startServer();
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
});

after(async () => {
  if (browser) await browser.close();
  if (server) server.kill("SIGTERM");
  if (keyed) keyed.kill("SIGTERM");
  await Promise.all([server, keyed].filter(Boolean).map((p) => new Promise((done) => (p.exitCode !== null ? done() : p.on("exit", done)))));
  for (const dir of dataDirs) rmSync(dir, { recursive: true, force: true });
});

test("upload an image and generate a PDF, following both live", async () => {
  const page = await browser.newPage();
  const problems = [];
  page.on("console", (m) => m.type() === "error" && problems.push(m.text()));
  page.on("pageerror", (e) => problems.push(e.message));

  await page.goto(base + "/");
  await page.waitForFunction(() => document.getElementById("conn-state").textContent === "connected");

  // Image: pick a file, choose WebP, submit; the job must reach "succeeded" through WebSocket
  // events only (the page never polls).
  await page.setInputFiles("#files", { name: "red-blue.png", mimeType: "image/png", buffer: png(800, 600) });
  await page.selectOption("#format", "webp");
  await page.getByRole("button", { name: "Process images" }).click();
  const imageJob = page.locator("li.job", { hasText: "red-blue.png" });
  await imageJob.locator('[data-status="succeeded"], .status-succeeded').first().waitFor({ timeout: 20000 });
  assert.equal(await imageJob.getAttribute("data-status"), "succeeded");
  assert.equal(await imageJob.locator("progress").evaluate((p) => p.value), 1);
  await page.waitForFunction(() => {
    const img = document.querySelector("li.job .result img");
    return img && img.complete && img.naturalWidth === 256 && img.naturalHeight === 192;
  });
  const imageHref = await imageJob.locator(".result a").getAttribute("href");
  const image = await page.request.get(base + imageHref);
  assert.equal(image.status(), 200);
  assert.equal(image.headers()["content-type"], "image/webp");

  // PDF from the form, table pasted as CSV (with a quoted comma).
  await page.fill("#title", "Browser report");
  await page.fill("#csv", 'Item,Qty,Note\nWidget,3,"small, blue"\nGadget,1,big');
  await page.getByRole("button", { name: "Generate PDF" }).click();
  const pdfJob = page.locator("li.job", { hasText: "Browser report.pdf" });
  await pdfJob.locator(".status-succeeded").waitFor({ timeout: 20000 });
  const pdfHref = await pdfJob.locator(".result a").getAttribute("href");
  const pdf = await page.request.get(base + pdfHref);
  assert.equal(pdf.headers()["content-type"], "application/pdf");
  assert.equal((await pdf.body()).subarray(0, 5).toString(), "%PDF-");

  mkdirSync(shots, { recursive: true });
  await page.screenshot({ path: join(shots, "desktop.png"), fullPage: true });

  // Phone width: nothing wider than the screen.
  await page.setViewportSize({ width: 375, height: 800 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `page is ${overflow}px wider than a 375px screen`);
  await page.screenshot({ path: join(shots, "phone.png"), fullPage: true });

  // Keyboard: every form control has a label.
  const unlabelled = await page.evaluate(() =>
    [...document.querySelectorAll("input, select, textarea")].filter((el) => !el.labels || el.labels.length === 0).map((el) => el.id),
  );
  assert.deepEqual(unlabelled, []);

  assert.deepEqual(problems, [], "console errors on the page");

  // The API reference page renders the served OpenAPI document.
  await page.getByRole("link", { name: "API reference" }).click();
  await page.locator("section.operation").first().waitFor({ timeout: 10000 });
  const operations = await page.locator("section.operation h2").allTextContents();
  assert.ok(operations.includes("POST /generate-pdf") && operations.includes("GET /jobs/{id}"), operations.join(", "));
  assert.deepEqual(problems, [], "console errors on the API page");
});

test("with API keys the page asks for one, keeps it for the tab and uses it everywhere", async () => {
  const key = "browser-key-0123456789abcdef";
  let keyedBase;
  [keyed, keyedBase] = await startServer(["--api-keys", key]);
  const page = await browser.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(e.message));
  await page.goto(keyedBase + "/");
  const form = page.locator("#key-form");
  await form.waitFor({ state: "visible", timeout: 10000 });

  // A wrong key is refused and the form stays.
  await page.fill("#api-key", "not-the-key-0123456789abcdef");
  await page.getByRole("button", { name: "Use key" }).click();
  await page.waitForFunction(() => document.getElementById("key-error").textContent.includes("refused"));
  assert.ok(await form.isVisible());

  await page.fill("#api-key", key);
  await page.getByRole("button", { name: "Use key" }).click();
  await page.waitForFunction(() => document.getElementById("conn-state").textContent === "connected");
  assert.ok(await form.isHidden());

  // A job submitted, followed over the WebSocket and downloaded, all with the key.
  await page.fill("#title", "Keyed report");
  await page.getByRole("button", { name: "Generate PDF" }).click();
  const job = page.locator("li.job", { hasText: "Keyed report.pdf" });
  await job.locator(".status-succeeded").waitFor({ timeout: 20000 });
  const link = job.locator(".result a");
  await link.waitFor({ timeout: 10000 });
  assert.match(await link.getAttribute("href"), /^blob:/);
  const head = await link.evaluate(async (a) => new Uint8Array(await (await fetch(a.href)).arrayBuffer()).slice(0, 5));
  assert.equal(String.fromCharCode(...Object.values(head)), "%PDF-");

  // The key is kept for the tab: a reload connects without asking.
  await page.reload();
  await page.waitForFunction(() => document.getElementById("conn-state").textContent === "connected");
  assert.ok(await form.isHidden());
  assert.equal(await page.evaluate(() => sessionStorage.getItem("offload-api-key")), key);
  // Without the key, the API refuses.
  const anonymous = await page.request.get(keyedBase + "/jobs");
  assert.equal(anonymous.status(), 401);
  assert.deepEqual(problems, [], "errors on the page");
});
