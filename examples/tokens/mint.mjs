// Mints an Ordo client token: a standard JWT, as your backend would after logging a user in.
//
//   npm install
//   node mint.mjs --user alice --device laptop --secret-file ../../ordo-data/secret        # HS256
//   node mint.mjs --user alice --device laptop --key es.pem --kid es-2026-01 --alg ES256   # with --jwks
//
// Options: --alg ES256|RS256 (by default the key's), --ttl SECS (3600), --issuer ISS and
// --audience AUD (when the server is started with --jwt-issuer / --jwt-audience), --secret S
// instead of --secret-file.
import { createPrivateKey } from "node:crypto";
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import jwt from "jsonwebtoken";

const { values: o } = parseArgs({
  options: {
    user: { type: "string" },
    device: { type: "string" },
    "secret-file": { type: "string" },
    secret: { type: "string" },
    key: { type: "string" },
    kid: { type: "string" },
    alg: { type: "string" }, // RS256 or ES256; by default from the key
    ttl: { type: "string", default: "3600" },
    issuer: { type: "string" },
    audience: { type: "string" },
  },
});
if (!o.user || !o.device) throw new Error("--user and --device are required");

const now = Math.floor(Date.now() / 1000);
const claims = {
  sub: o.user, // the user id
  device: o.device, // the device id
  iat: now, // needed for a revocation to spare tokens issued after it
  exp: now + Number(o.ttl),
};
if (o.issuer) claims.iss = o.issuer;
if (o.audience) claims.aud = o.audience;

let token;
if (o.key) {
  // RS256 (RSA key) or ES256 (P-256 key): the public half is in the server's JWKS file.
  const key = readFileSync(o.key);
  const alg = o.alg ?? (createPrivateKey(key).asymmetricKeyType === "ec" ? "ES256" : "RS256");
  const header = o.kid ? { kid: o.kid } : undefined;
  token = jwt.sign(claims, key, { algorithm: alg, header });
} else {
  // HS256 with the server's secret: the text of <data>/secret (or its --secret), as it is.
  const secret = o.secret ?? readFileSync(o["secret-file"], "utf8").trim();
  token = jwt.sign(claims, secret, { algorithm: "HS256" });
}
console.log(token);
