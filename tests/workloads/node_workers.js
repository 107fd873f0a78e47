// Node.js's event loop with worker threads: node node_workers.js OUT READY GO
// Four workers step on timers, adding what they compute into a SharedArrayBuffer with
// Atomics and posting each step to the main thread, which keeps them in order per worker.
// READY appears after every worker's first step; once all are done, the program waits
// (on a timer) until GO exists, then writes OUT: every step of every worker and the sum.
'use strict';
const { Worker, isMainThread, parentPort, workerData } = require('worker_threads');
const fs = require('fs');
const WORKERS = 4, STEPS = 40;

if (isMainThread) {
  const [out, ready, go] = process.argv.slice(2);
  const shared = new BigInt64Array(new SharedArrayBuffer(8 * WORKERS));
  const lines = Array.from({ length: WORKERS }, () => []);
  let started = 0, ended = 0;
  for (let j = 0; j < WORKERS; j++) {
    const w = new Worker(__filename, { workerData: { j, buffer: shared.buffer } });
    w.on('message', (m) => {
      lines[j].push(m);
      if (lines[j].length === 1 && ++started === WORKERS) fs.writeFileSync(ready, '');
    });
    w.on('exit', () => { if (++ended === WORKERS) waitForGo(); });
  }
  const waitForGo = () => {
    if (!fs.existsSync(go)) { setTimeout(waitForGo, 10); return; }
    const sum = shared.reduce((a, b) => a + b, 0n);
    fs.writeFileSync(out, lines.map((l) => l.join('\n')).join('\n') + `\nsum ${sum}\n`);
  };
} else {
  const shared = new BigInt64Array(workerData.buffer);
  let acc = workerData.j, step = 0;
  const timer = setInterval(() => {
    for (let k = 0; k < 50000; k++) acc = (acc * 31 + k + step) % 1000003;
    Atomics.add(shared, workerData.j, BigInt(acc));
    parentPort.postMessage(`worker ${workerData.j} step ${step} ${acc}`);
    if (++step === STEPS) clearInterval(timer);
  }, 20);
}
