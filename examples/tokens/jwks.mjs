// Prints the JWKS file for `ordo serve --jwks FILE`: the public halves of PEM keys (private or
// public), each under its kid. No dependency beyond Node itself.
//
//   node jwks.mjs es-2026-01=es.pem rs-2026-01=rs.pem > jwks.json
import { createPublicKey } from "node:crypto";
import { readFileSync } from "node:fs";

const keys = process.argv.slice(2).map((arg) => {
  const eq = arg.indexOf("=");
  if (eq < 1) throw new Error(`expected KID=FILE.pem, got ${arg}`);
  const kid = arg.slice(0, eq);
  const pub = createPublicKey(readFileSync(arg.slice(eq + 1)));
  const jwk = pub.export({ format: "jwk" }); // public parts only
  const alg = jwk.kty === "RSA" ? "RS256" : "ES256"; // the server takes RSA and P-256 keys
  return { ...jwk, kid, alg, use: "sig" };
});
console.log(JSON.stringify({ keys }, null, 2));
