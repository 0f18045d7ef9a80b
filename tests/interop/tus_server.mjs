// A reference tus server (@tus/server with its file store) behind Node's HTTPS server with mutual TLS,
// for interop tests of our uploader. Usage: node tus_server.mjs STORE_DIR CERT_DIR [PORT]
// Prints "PORT <n>" when listening; exits by itself after 120 s.
import fs from 'node:fs';
import https from 'node:https';
import { Server } from '@tus/server';
import { FileStore } from '@tus/file-store';

const [storeDir, certDir, port = '0'] = process.argv.slice(2);
// relativeLocation: behind Node's https server the library cannot tell its own scheme.
const tus = new Server({ path: '/files', relativeLocation: true, datastore: new FileStore({ directory: storeDir }) });
const read = (name) => fs.readFileSync(`${certDir}/${name}`);
const server = https.createServer(
  { key: read('server.key'), cert: read('server.crt'), ca: read('ca.crt'), requestCert: true, rejectUnauthorized: true },
  (req, res) => tus.handle(req, res),
);
server.listen(Number(port), '127.0.0.1', () => console.log(`PORT ${server.address().port}`));
setTimeout(() => process.exit(0), 120_000).unref();
