"""Secure aggregation: the coordinator learns the sum of the sites' updates and nothing of any one.

The protocol is Bonawitz et al. (CCS 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning") with its consistency round, in five stages per round. Nothing here knows of
Flower: `SiteSession` is one site's side of one round, `Aggregator` the coordinator's; the Flower
apps only carry their messages.

1. advertise    each site makes two X25519 key pairs (c: to encrypt shares, s: to derive masks)
                and signs both public keys with its identity key (the key registered with the
                coordinator out of band, the one its SuperNode authenticates with).
2. share keys   each site checks every signature against the roster it holds (not the one the
                coordinator relays), Shamir-shares its mask secret s_sk and a fresh self-mask
                seed b among the advertised sites, and sends each peer's shares encrypted
                (ChaCha20-Poly1305 under the c-key agreement) through the coordinator.
3. masked input y_i = x_i + PRG(b_i) + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij)   (mod 2^32), where
                x_i is the fixed-point encoded update and PRG is ChaCha20's key stream.
4. consistency  the coordinator names the sites whose masked input arrived; each signs that list.
5. unmask       given at least `threshold` signatures on one and the same list, a site reveals, for
                each peer, exactly one kind of share: the b share of a survivor or the s_sk share
                of a dropped site. Asked for anything else (both kinds for one peer, a list that
                differs from the signed one, a second request) it refuses.

The coordinator removes the dropped sites' pairwise masks (s_sk reconstructed, agreements redone
with the survivors' public s keys) and the survivors' self masks (b reconstructed). What it sees of
one site is y_i, uniform in Z_{2^32}^n whatever x_i is, and never both b_i and s_sk_i. Up to
n - threshold sites may drop at any stage; fewer than `threshold` left aborts the round.

Arithmetic is in Z_{2^32} (uint32, wrapping): an upload is as large as float32 (Flower's SecAgg+
sends int64). Values are fixed point with `frac_bits` fractional bits, clipped to +-`bound` so the
sum of all sites can never wrap: n * bound * 2^frac_bits < 2^31.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RING_BITS = 32
PRIME = 2**521 - 1  # Shamir field: a Mersenne prime above any 32-byte secret
KEY_BYTES = 32

IdentityPrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
IdentityPublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class SecAggError(Exception):
    """A protocol violation or an impossible round: the round must abort, nothing is revealed."""


# ---------------------------------------------------------------------------------------------
# Fixed-point encoding


def frac_bits_for(sites: int, bound: float) -> int:
    """The most fractional bits for which `sites` values in [-bound, bound] sum without wrapping."""
    if sites < 1 or bound <= 0:
        raise ValueError("need at least one site and a positive bound")
    bits = RING_BITS - 1 - math.ceil(math.log2(sites * bound)) - 1  # one bit of slack for rounding
    if bits < 8:
        raise ValueError(f"bound {bound} with {sites} sites leaves only {bits} fractional bits")
    return bits


def encode(values: np.ndarray, frac_bits: int, bound: float) -> tuple[np.ndarray, int]:
    """Float values as ring elements (uint32), clipped to +-bound; also how many were clipped."""
    values = np.asarray(values, dtype=np.float64)
    clipped = int(np.count_nonzero(np.abs(values) > bound))
    fixed = np.rint(np.clip(values, -bound, bound) * 2.0**frac_bits).astype(np.int64)
    return (fixed % 2**RING_BITS).astype(np.uint32), clipped  # two's complement: negatives wrap into the ring


def decode(ring: np.ndarray, frac_bits: int) -> np.ndarray:
    """A ring sum back to floats (signed: the sum never wraps, see `frac_bits_for`)."""
    return np.asarray(ring, dtype=np.uint32).view(np.int32).astype(np.float64) / 2.0**frac_bits


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` uniform uint32 from a 32-byte seed: ChaCha20's key stream (zero nonce: one stream per seed)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * length)), dtype="<u4")


# ---------------------------------------------------------------------------------------------
# Shamir secret sharing over GF(2^521 - 1)


def shamir_split(secret: bytes, holders: Iterable[int], threshold: int) -> dict[int, int]:
    """Shares of `secret` for each holder (its x-coordinate is its site number, never 0)."""
    value = int.from_bytes(secret, "big")
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in holders:
        if x <= 0:
            raise ValueError("share holders are numbered from 1")
        y = 0
        for coefficient in reversed(coefficients):
            y = (y * x + coefficient) % PRIME
        shares[x] = y
    return shares


def shamir_combine(shares: Mapping[int, int], threshold: int, size: int = KEY_BYTES) -> bytes:
    """The secret from at least `threshold` shares (Lagrange interpolation at 0)."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares, {threshold} needed")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (x_i, y_i) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(points):
            if i != j:
                numerator = numerator * -x_j % PRIME
                denominator = denominator * (x_i - x_j) % PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * size):
        raise SecAggError("shares do not combine to a secret (inconsistent shares)")
    return secret.to_bytes(size, "big")


# ---------------------------------------------------------------------------------------------
# Identity signatures and key agreement


def sign(key: IdentityPrivateKey, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify(key: IdentityPublicKey, signature: bytes, data: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        else:
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def load_identity_public_key(pem: bytes) -> IdentityPublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise ValueError("an identity key is an EC (ECDSA) or Ed25519 public key")
    return key


def _raw(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _derive(shared: bytes, context: bytes, purpose: bytes) -> bytes:
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=b"adaptery-secagg|" + purpose + b"|" + context).derive(
        shared
    )


def _pair_seed(s_private: bytes, peer_s_public: bytes, context: bytes) -> bytes:
    shared = X25519PrivateKey.from_private_bytes(s_private).exchange(X25519PublicKey.from_public_bytes(peer_s_public))
    return _derive(shared, context, b"mask")


def _advert_bytes(context: bytes, site: int, c_public: bytes, s_public: bytes) -> bytes:
    return b"advertise|" + context + struct.pack(">I", site) + c_public + s_public


def _survivors_bytes(context: bytes, survivors: Iterable[int]) -> bytes:
    return b"survivors|" + context + b"".join(struct.pack(">I", s) for s in sorted(survivors))


@dataclass(frozen=True)
class Advertisement:
    site: int
    c_public: bytes
    s_public: bytes
    signature: bytes

    def to_dict(self) -> dict[str, bytes | int]:
        return {"site": self.site, "c": self.c_public, "s": self.s_public, "sig": self.signature}

    @classmethod
    def from_dict(cls, data: Mapping) -> Advertisement:
        return cls(int(data["site"]), bytes(data["c"]), bytes(data["s"]), bytes(data["sig"]))


@dataclass
class UnmaskReply:
    """What a site reveals: self-mask (b) shares of survivors, mask-key (s_sk) shares of dropped sites."""

    site: int
    b_shares: dict[int, int]
    s_shares: dict[int, int]


def check_params(sites: int, threshold: int) -> None:
    if not sites // 2 + 1 <= threshold <= sites:
        raise ValueError(f"threshold must be a majority of the {sites} sites and at most all of them, not {threshold}")


# ---------------------------------------------------------------------------------------------
# One site


@dataclass
class SiteSession:
    """One site's side of one round. `roster` maps every site number to its identity public key, as the
    site itself holds it (registered out of band): a key the coordinator relays is never trusted."""

    site: int
    identity: IdentityPrivateKey
    roster: Mapping[int, IdentityPublicKey]
    threshold: int
    context: bytes  # federation and round: binds signatures, keys and ciphertexts to this round
    stage: str = "new"
    c_private: bytes = b""
    s_private: bytes = b""
    self_seed: bytes = b""
    adverts: dict[int, Advertisement] = field(default_factory=dict)
    shares_in: dict[int, tuple[int, int]] = field(default_factory=dict)  # peer -> (its b share, its s_sk share)
    held_by: list[int] = field(default_factory=list)  # U2: the sites whose shares reached this site
    survivors: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.site not in self.roster:
            raise SecAggError(f"site {self.site} is not on the roster")
        check_params(len(self.roster), self.threshold)

    def _expect(self, stage: str, then: str) -> None:
        if self.stage != stage:
            raise SecAggError(f"site {self.site}: asked for '{then}' at stage '{self.stage}' (expected '{stage}')")
        self.stage = then

    def advertise(self) -> Advertisement:
        self._expect("new", "advertised")
        c_key, s_key = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self.c_private = c_key.private_bytes_raw()
        self.s_private = s_key.private_bytes_raw()
        c_public, s_public = _raw(c_key.public_key()), _raw(s_key.public_key())
        signature = sign(self.identity, _advert_bytes(self.context, self.site, c_public, s_public))
        return Advertisement(self.site, c_public, s_public, signature)

    def share_keys(self, adverts: Mapping[int, Advertisement]) -> dict[int, bytes]:
        """Check every advertisement's signature, then shares of (b, s_sk) for each peer, encrypted to it."""
        self._expect("advertised", "shared")
        for site, advert in adverts.items():
            if site != advert.site or site not in self.roster:
                raise SecAggError(f"advertisement for unknown site {site}")
            data = _advert_bytes(self.context, site, advert.c_public, advert.s_public)
            if not verify(self.roster[site], advert.signature, data):
                raise SecAggError(f"site {site}'s public keys are not signed by its registered identity key")
        own = adverts.get(self.site)
        if own is None or own.s_public != _raw(X25519PrivateKey.from_private_bytes(self.s_private).public_key()):
            raise SecAggError("the coordinator did not relay this site's own keys unchanged")
        if len(adverts) < self.threshold:
            raise SecAggError(f"{len(adverts)} sites advertised keys, {self.threshold} needed")
        self.adverts = dict(adverts)
        self.self_seed = secrets.token_bytes(KEY_BYTES)
        b_shares = shamir_split(self.self_seed, adverts, self.threshold)
        s_shares = shamir_split(self.s_private, adverts, self.threshold)
        self.shares_in[self.site] = (b_shares[self.site], s_shares[self.site])
        out = {}
        for peer in adverts:
            if peer == self.site:
                continue
            payload = json.dumps({"from": self.site, "to": peer, "b": b_shares[peer], "s": s_shares[peer]}).encode()
            nonce = secrets.token_bytes(12)
            out[peer] = nonce + self._channel(peer).encrypt(nonce, payload, self._aad(self.site, peer))
        return out

    def _channel(self, peer: int) -> ChaCha20Poly1305:
        shared = X25519PrivateKey.from_private_bytes(self.c_private).exchange(
            X25519PublicKey.from_public_bytes(self.adverts[peer].c_public)
        )
        return ChaCha20Poly1305(_derive(shared, self.context, b"shares"))

    def _aad(self, sender: int, receiver: int) -> bytes:
        return self.context + struct.pack(">II", sender, receiver)

    def masked_input(self, ciphertexts: Mapping[int, bytes], update: np.ndarray) -> np.ndarray:
        """The encoded update (uint32) under its self mask and the pairwise masks of every site in U2."""
        self._expect("shared", "masked")
        for sender, blob in ciphertexts.items():
            if sender not in self.adverts or sender == self.site:
                raise SecAggError(f"shares from site {sender}, which did not advertise keys")
            try:
                payload = json.loads(self._channel(sender).decrypt(blob[:12], blob[12:], self._aad(sender, self.site)))
            except InvalidTag as error:
                raise SecAggError(f"shares from site {sender} do not decrypt (tampered in transit)") from error
            if payload["from"] != sender or payload["to"] != self.site:
                raise SecAggError(f"shares from site {sender} are addressed wrongly")
            self.shares_in[sender] = (int(payload["b"]), int(payload["s"]))
        self.held_by = sorted({*ciphertexts, self.site})
        if len(self.held_by) < self.threshold:
            raise SecAggError(f"{len(self.held_by)} sites shared keys, {self.threshold} needed")
        update = np.asarray(update, dtype=np.uint32)
        masked = update + prg(self.self_seed, update.size)
        for peer in self.held_by:
            if peer == self.site:
                continue
            mask = prg(_pair_seed(self.s_private, self.adverts[peer].s_public, self.context), update.size)
            masked = masked + mask if self.site < peer else masked - mask
        return masked

    def sign_survivors(self, survivors: Iterable[int]) -> bytes:
        """Consistency round: sign the list of sites whose masked input the coordinator says it holds."""
        self._expect("masked", "signed")
        survivors = sorted(set(survivors))
        if self.site not in survivors:
            raise SecAggError("this site's masked input is missing from the survivors")
        if not set(survivors) <= set(self.held_by):
            raise SecAggError("a survivor never shared keys with this site")
        if len(survivors) < self.threshold:
            raise SecAggError(f"{len(survivors)} survivors, {self.threshold} needed")
        self.survivors = survivors
        return sign(self.identity, _survivors_bytes(self.context, survivors))

    def unmask(self, survivors: Iterable[int], dropped: Iterable[int], signatures: Mapping[int, bytes]) -> UnmaskReply:
        """One kind of share per peer: b for a survivor, s_sk for a dropped site; refuse anything else."""
        self._expect("signed", "unmasked")
        survivors, dropped = sorted(set(survivors)), sorted(set(dropped))
        if set(survivors) & set(dropped):
            raise SecAggError(f"asked for both kinds of share for sites {sorted(set(survivors) & set(dropped))}")
        if survivors != self.survivors:
            raise SecAggError("the survivors differ from the list this site signed")
        if set(dropped) != set(self.held_by) - set(survivors):
            raise SecAggError("the dropped sites are not exactly those that shared keys and sent no input")
        data = _survivors_bytes(self.context, survivors)
        valid = [s for s, sig in signatures.items() if s in survivors and verify(self.roster[s], sig, data)]
        if len(valid) < self.threshold:
            raise SecAggError(f"{len(valid)} valid consistency signatures, {self.threshold} needed")
        return UnmaskReply(
            self.site,
            b_shares={peer: self.shares_in[peer][0] for peer in survivors},
            s_shares={peer: self.shares_in[peer][1] for peer in dropped},
        )

    # Between stages a site's state lives in Flower's node context (on the site): it is serialised here.
    def dump(self) -> bytes:
        def b64(raw: bytes) -> str:
            return base64.b64encode(raw).decode()

        return json.dumps(
            {
                "site": self.site,
                "stage": self.stage,
                "c": b64(self.c_private),
                "s": b64(self.s_private),
                "b": b64(self.self_seed),
                "adverts": {
                    str(k): {n: b64(v) for n, v in a.to_dict().items() if n != "site"} for k, a in self.adverts.items()
                },
                "shares_in": {str(k): list(v) for k, v in self.shares_in.items()},
                "held_by": self.held_by,
                "survivors": self.survivors,
            }
        ).encode()

    @classmethod
    def load(
        cls,
        data: bytes,
        identity: IdentityPrivateKey,
        roster: Mapping[int, IdentityPublicKey],
        threshold: int,
        context: bytes,
    ) -> SiteSession:
        state = json.loads(data)
        session = cls(state["site"], identity, roster, threshold, context, stage=state["stage"])
        session.c_private = base64.b64decode(state["c"])
        session.s_private = base64.b64decode(state["s"])
        session.self_seed = base64.b64decode(state["b"])
        session.adverts = {
            int(k): Advertisement(int(k), *(base64.b64decode(a[n]) for n in ("c", "s", "sig")))
            for k, a in state["adverts"].items()
        }
        session.shares_in = {int(k): (int(v[0]), int(v[1])) for k, v in state["shares_in"].items()}
        session.held_by = list(state["held_by"])
        session.survivors = list(state["survivors"])
        return session


# ---------------------------------------------------------------------------------------------
# The coordinator


@dataclass
class Aggregator:
    """The coordinator's side of one round. It holds only public keys, ciphertexts it cannot open and
    masked inputs; `received` keeps every masked input as it arrived (tests assert on it)."""

    roster: Mapping[int, IdentityPublicKey]
    threshold: int
    context: bytes
    length: int
    adverts: dict[int, Advertisement] = field(default_factory=dict)
    shared: list[int] = field(default_factory=list)  # U2
    received: dict[int, np.ndarray] = field(default_factory=dict)  # U3 -> masked input
    signatures: dict[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_params(len(self.roster), self.threshold)

    def _need(self, sites: Iterable[int], what: str) -> None:
        count = len(list(sites))
        if count < self.threshold:
            raise SecAggError(f"only {count} sites {what}, {self.threshold} needed: round aborted")

    def collect_adverts(self, adverts: Iterable[Advertisement]) -> dict[int, Advertisement]:
        for advert in adverts:
            data = _advert_bytes(self.context, advert.site, advert.c_public, advert.s_public)
            if advert.site in self.roster and verify(self.roster[advert.site], advert.signature, data):
                self.adverts[advert.site] = advert
        self._need(self.adverts, "advertised keys")
        return dict(self.adverts)

    def route_shares(self, outboxes: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Each site's ciphertexts regrouped by recipient: inbox[receiver][sender]."""
        self.shared = sorted(s for s in outboxes if s in self.adverts)
        self._need(self.shared, "shared keys")
        inboxes: dict[int, dict[int, bytes]] = {site: {} for site in self.shared}
        for sender in self.shared:
            for receiver, blob in outboxes[sender].items():
                if receiver in inboxes:
                    inboxes[receiver][sender] = blob
        return inboxes

    def collect_masked(self, inputs: Mapping[int, np.ndarray]) -> list[int]:
        for site, vector in inputs.items():
            vector = np.asarray(vector, dtype=np.uint32)
            if site in self.shared and vector.shape == (self.length,):
                self.received[site] = vector
        self._need(self.received, "sent masked input")
        return sorted(self.received)

    def collect_signatures(self, signatures: Mapping[int, bytes]) -> dict[int, bytes]:
        data = _survivors_bytes(self.context, self.received)
        self.signatures = {
            s: sig for s, sig in signatures.items() if s in self.received and verify(self.roster[s], sig, data)
        }
        self._need(self.signatures, "signed the survivors")
        return dict(self.signatures)

    @property
    def dropped(self) -> list[int]:
        return sorted(set(self.shared) - set(self.received))

    def unmask(self, replies: Iterable[UnmaskReply]) -> np.ndarray:
        """The sum of the survivors' encoded updates (uint32)."""
        replies = [r for r in replies if r.site in self.signatures]
        self._need([r.site for r in replies], "revealed shares")
        total = np.zeros(self.length, dtype=np.uint32)
        for vector in self.received.values():
            total = total + vector
        for site in self.received:  # remove self masks
            seed = shamir_combine({r.site: r.b_shares[site] for r in replies if site in r.b_shares}, self.threshold)
            total = total - prg(seed, self.length)
        for site in self.dropped:  # remove what the dropped site's pairwise masks left in the survivors' inputs
            s_private = shamir_combine(
                {r.site: r.s_shares[site] for r in replies if site in r.s_shares}, self.threshold
            )
            if _raw(X25519PrivateKey.from_private_bytes(s_private).public_key()) != self.adverts[site].s_public:
                raise SecAggError(f"the shares of site {site}'s mask key do not match its advertised key")
            for peer in self.received:
                mask = prg(_pair_seed(s_private, self.adverts[peer].s_public, self.context), self.length)
                # The survivor added +mask when peer < site, -mask when peer > site: undo it.
                total = total - mask if peer < site else total + mask
        return total
