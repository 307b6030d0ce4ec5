// Development stand-in for messengerd's HTTP/WebSocket bridge, for working on the client
// against a daemon that does not serve it (yet): serves web/static/ over HTTPS with the
// daemon's CSP, and carries each binary WebSocket message on /start as one length-prefixed
// frame over the daemon's native TLS port (and back). Not used by the tests.
//
//   node tests/dev-bridge.mjs --daemon 127.0.0.1:7443 --tls-dir ../messenger-data/tls --listen 127.0.0.1:8443
import { readFile } from "node:fs/promises";
import { readFileSync } from "node:fs";
import https from "node:https";
import tls from "node:tls";
import { dirname, extname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { WebSocketServer } from "ws";

const { values: args } = parseArgs({
  options: {
    daemon: { type: "string", default: "127.0.0.1:7443" },
    "tls-dir": { type: "string", default: "../messenger-data/tls" },
    listen: { type: "string", default: "127.0.0.1:8443" },
  },
});
const STATIC = join(dirname(fileURLToPath(import.meta.url)), "..", "static");
const CSP =
  "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; " +
  "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".ico": "image/x-icon",
  ".map": "application/json",
  ".txt": "text/plain; charset=utf-8",
};
const [daemonHost, daemonPort] = args.daemon.split(":");
const [host, port] = args.listen.split(":");
const ca = readFileSync(join(args["tls-dir"], "dev-ca.pem"));

const server = https.createServer(
  {
    cert: readFileSync(join(args["tls-dir"], "cert.pem")),
    key: readFileSync(join(args["tls-dir"], "key.pem")),
  },
  async (req, res) => {
    const path = new URL(req.url, "https://x").pathname;
    const file = normalize(join(STATIC, path === "/" ? "index.html" : path));
    const type = TYPES[extname(file)];
    if (!file.startsWith(STATIC) || !type) return res.writeHead(404).end();
    try {
      const body = await readFile(file);
      res.writeHead(200, { "content-type": type, "content-security-policy": CSP }).end(body);
    } catch {
      res.writeHead(404).end();
    }
  },
);

const wss = new WebSocketServer({ server, path: "/start" });
wss.on("connection", (ws) => {
  const upstream = tls.connect({
    host: daemonHost,
    port: Number(daemonPort),
    ca,
    servername: "localhost",
    ALPNProtocols: ["messenger/1"],
  });
  let buf = Buffer.alloc(0);
  upstream.on("data", (chunk) => {
    buf = Buffer.concat([buf, chunk]);
    while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
      const n = buf.readUInt32BE(0);
      ws.send(buf.subarray(4, 4 + n), { binary: true });
      buf = buf.subarray(4 + n);
    }
  });
  upstream.on("close", () => ws.close(1000));
  upstream.on("error", () => ws.close(1011));
  ws.on("message", (data, isBinary) => {
    if (!isBinary) return ws.close(1003, "binary frames only");
    const prefix = Buffer.alloc(4);
    prefix.writeUInt32BE(data.length);
    upstream.write(Buffer.concat([prefix, data]));
  });
  ws.on("close", () => upstream.end());
});

server.listen(Number(port), host, () => console.log(`dev bridge on https://${args.listen}/ → ${args.daemon}`));
