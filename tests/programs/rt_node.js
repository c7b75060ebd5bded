// Node.js: a CPU loop with timers and promises, and libuv's thread pool (crypto.pbkdf2,
// fs) across a checkpoint.
const crypto = require("crypto");
const fs = require("fs");
const { promisify } = require("util");
const pbkdf2 = promisify(crypto.pbkdf2);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  console.log("READY");
  let acc = 0;
  const keys = [];
  for (let i = 0; i < 30; i++) {
    for (let k = 0; k < 300000; k++) acc = (acc + k * (i + 1)) % 1000003;
    keys.push((await pbkdf2("secret" + i, "salt", 2000, 16, "sha256")).toString("hex").slice(0, 8));
    await sleep(10);
    if (i % 10 === 0) console.log("round", i);
  }
  const self = await fs.promises.readFile(__filename, "utf8");
  const ticks = await new Promise((resolve) => {
    let n = 0;
    const t = setInterval(() => { if (++n === 5) { clearInterval(t); resolve(n); } }, 5);
  });
  console.log("acc", acc, "keys", keys.join("").slice(0, 24), "file", self.length > 100, "ticks", ticks);
}
main();
