"""Mints an Ordo client token: a standard JWT, as your backend would after logging a user in.

    pip install PyJWT cryptography   # cryptography only for RS256/ES256
    python mint.py --user alice --device laptop --secret-file ../../ordo-data/secret        # HS256
    python mint.py --user alice --device laptop --key es.pem --kid es-2026-01 --alg ES256   # with --jwks

Options: --alg ES256|RS256 (by default the key's), --ttl SECS (3600), --issuer ISS and
--audience AUD (when the server is started with --jwt-issuer / --jwt-audience), --secret S
instead of --secret-file.
"""

import argparse
import time

import jwt  # PyJWT

p = argparse.ArgumentParser()
p.add_argument("--user", required=True)
p.add_argument("--device", required=True)
p.add_argument("--secret-file")
p.add_argument("--secret")
p.add_argument("--key", help="PEM private key (RS256/ES256)")
p.add_argument("--kid")
p.add_argument("--alg", choices=["RS256", "ES256"], help="by default from the key")
p.add_argument("--ttl", type=int, default=3600)
p.add_argument("--issuer")
p.add_argument("--audience")
a = p.parse_args()

now = int(time.time())
claims = {
    "sub": a.user,  # the user id
    "device": a.device,  # the device id
    "iat": now,  # needed for a revocation to spare tokens issued after it
    "exp": now + a.ttl,
}
if a.issuer:
    claims["iss"] = a.issuer
if a.audience:
    claims["aud"] = a.audience

if a.key:
    # RS256 (RSA key) or ES256 (P-256 key): the public half is in the server's JWKS file.
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    with open(a.key, "rb") as f:
        key = load_pem_private_key(f.read(), password=None)
    alg = a.alg or ("ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256")
    headers = {"kid": a.kid} if a.kid else None
    token = jwt.encode(claims, key, algorithm=alg, headers=headers)
else:
    # HS256 with the server's secret: the text of <data>/secret (or its --secret), as it is.
    if a.secret:
        secret = a.secret
    else:
        with open(a.secret_file) as f:
            secret = f.read().strip()
    token = jwt.encode(claims, secret, algorithm="HS256")
print(token)
