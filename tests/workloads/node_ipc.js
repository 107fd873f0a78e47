// Node.js's child_process.fork: node node_ipc.js OUT READY GO
// A parent forks two children and talks to each over the IPC channel node makes (a unix
// socketpair), sending work and waiting for both answers before the next step (on a timer).
// READY appears after the first step; after STEPS steps the parent waits (on a timer) until
// GO exists, writes OUT, ends its children and waits for their exit codes, which it appends.
'use strict';
const { fork } = require('child_process');
const fs = require('fs');
const STEPS = 60;

if (process.argv[2] === 'child') {
  process.on('message', (n) => {
    let acc = n;
    for (let k = 0; k < 100000; k++) acc = (acc * 31 + k + n) % 1000003;
    process.send(acc);
  });
  process.on('disconnect', () => process.exit(0));
} else {
  const [out, ready, go] = process.argv.slice(2);
  const kids = [fork(__filename, ['child']), fork(__filename, ['child'])];
  const got = [0, 0], lines = [];
  let step = 0, waiting = 0, sum = 0;
  const next = () => {
    if (step === STEPS) { finish(); return; }
    waiting = kids.length;
    kids.forEach((k, j) => k.send(step * 2 + j));
  };
  kids.forEach((k, j) => k.on('message', (v) => {
    got[j] = v;
    if (--waiting > 0) return;
    sum = (sum * 7 + got[0] * 3 + got[1]) % 1000000007;
    lines.push(`step ${step} ${got[0]} ${got[1]} ${sum}`);
    if (++step === 1) fs.writeFileSync(ready, '');
    setTimeout(next, 15);
  }));
  let exited = 0;
  const codes = [];
  const finish = () => {
    if (!fs.existsSync(go)) { setTimeout(finish, 10); return; }
    kids.forEach((k, j) => k.on('exit', (code) => {
      codes[j] = code;
      if (++exited === kids.length) fs.writeFileSync(out, lines.join('\n') + `\nchildren exited ${codes.join(' ')}\n`);
    }));
    kids.forEach((k) => k.disconnect());
  };
  next();
}
