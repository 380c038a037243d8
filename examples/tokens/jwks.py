"""Prints the JWKS file for `ordo serve --jwks FILE`: the public halves of PEM keys (private or
public), each under its kid.

    pip install PyJWT cryptography
    python jwks.py es-2026-01=es.pem rs-2026-01=rs.pem > jwks.json
"""

import json
import sys

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

keys = []
for arg in sys.argv[1:]:
    kid, _, path = arg.partition("=")
    if not kid or not path:
        sys.exit(f"expected KID=FILE.pem, got {arg}")
    with open(path, "rb") as f:
        pem = f.read()
    try:
        key = load_pem_private_key(pem, password=None).public_key()
    except ValueError:
        key = load_pem_public_key(pem)
    if isinstance(key, rsa.RSAPublicKey):
        jwk, alg = RSAAlgorithm.to_jwk(key, as_dict=True), "RS256"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        jwk, alg = ECAlgorithm.to_jwk(key, as_dict=True), "ES256"  # the server takes P-256 only
    else:
        sys.exit(f"{path}: not an RSA or EC key")
    keys.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
print(json.dumps({"keys": keys}, indent=2))
