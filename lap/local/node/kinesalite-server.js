// Starts kinesalite bound to one address only (its own CLI listens on all
// interfaces). Usage: node kinesalite-server.js HOST PORT DATA_DIR SHARD_LIMIT
'use strict';
const kinesalite = require('kinesalite');

const [host, port, dataDir, shardLimit] = process.argv.slice(2);
if (!host || !port || !dataDir) {
  console.error('usage: kinesalite-server.js HOST PORT DATA_DIR [SHARD_LIMIT]');
  process.exit(2);
}

const server = kinesalite({
  path: dataDir,               // LevelDB on disk: survives a crash of this process
  createStreamMs: 50,
  deleteStreamMs: 50,
  updateStreamMs: 50,
  shardLimit: Number(shardLimit || 64),
});

// Node closes a connection idle for 5 s by default, and a client that sends on it at that moment (a
// consumer or an ingest replica slowed by a busy machine) gets a reset: keep connections for longer than
// clients keep them idle.
server.keepAliveTimeout = 65000;
server.headersTimeout = 66000;

server.listen(Number(port), host, () => {
  console.log(`kinesalite listening on ${host}:${port}, data in ${dataDir}`);
});

function stop(signal) {
  console.log(`kinesalite: ${signal}, closing`);
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 3000).unref();
}
process.on('SIGTERM', () => stop('SIGTERM'));
process.on('SIGINT', () => stop('SIGINT'));
