"""The secure aggregation protocol alone (no Flower): exact sums, masked views, dropouts, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from adaptery.federated import secagg
from adaptery.federated.secagg import Aggregator, SecAggError, SiteSession

LENGTH = 257


def federation(sites: int = 4, threshold: int = 3, context: bytes = b"fed-1|round-1"):
    keys = {site: ec.generate_private_key(ec.SECP256R1()) for site in range(1, sites + 1)}
    roster = {site: key.public_key() for site, key in keys.items()}
    sessions = {site: SiteSession(site, keys[site], roster, threshold, context) for site in keys}
    return keys, roster, sessions, Aggregator(roster, threshold, context, LENGTH)


def updates(sites, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    frac = secagg.frac_bits_for(len(sites), 1.0)
    return {site: secagg.encode(rng.uniform(-1, 1, LENGTH), frac, 1.0)[0] for site in sites}


def run_round(sessions, server, vectors, drop_before_input=(), drop_before_unmask=()):
    adverts = server.collect_adverts([s.advertise() for s in sessions.values()])
    inboxes = server.route_shares({site: s.share_keys(adverts) for site, s in sessions.items()})
    live = [site for site in inboxes if site not in drop_before_input]
    survivors = server.collect_masked(
        {site: sessions[site].masked_input(inboxes[site], vectors[site]) for site in live}
    )
    signatures = server.collect_signatures({site: sessions[site].sign_survivors(survivors) for site in survivors})
    replies = [
        sessions[site].unmask(survivors, server.dropped, signatures)
        for site in survivors
        if site not in drop_before_unmask
    ]
    return server.unmask(replies)


def plain_sum(vectors, sites) -> np.ndarray:
    total = np.zeros(LENGTH, dtype=np.uint32)
    for site in sites:
        total = total + vectors[site]
    return total


def test_sum_is_exact():
    _, _, sessions, server = federation()
    vectors = updates(sessions)
    assert np.array_equal(run_round(sessions, server, vectors), plain_sum(vectors, sessions))


def test_fixed_point_round_trip_within_precision():
    rng = np.random.default_rng(1)
    values = [rng.uniform(-1, 1, LENGTH) for _ in range(3)]
    frac = secagg.frac_bits_for(3, 1.0)
    total = np.zeros(LENGTH, dtype=np.uint32)
    for v in values:
        total = total + secagg.encode(v, frac, 1.0)[0]
    assert np.max(np.abs(secagg.decode(total, frac) - sum(values))) <= 3 * 2.0**-frac
    assert secagg.encode(np.array([2.0, -3.0, 0.5]), frac, 1.0)[1] == 2  # two values clipped, counted


def test_dropped_site_masks_are_removed():
    _, _, sessions, server = federation(sites=4, threshold=3)
    vectors = updates(sessions, seed=2)
    total = run_round(sessions, server, vectors, drop_before_input={3})
    assert server.dropped == [3]
    assert np.array_equal(total, plain_sum(vectors, [1, 2, 4]))


def test_site_dropping_during_unmask_is_survived():
    _, _, sessions, server = federation(sites=4, threshold=3)
    vectors = updates(sessions, seed=3)
    total = run_round(sessions, server, vectors, drop_before_unmask={2})
    assert np.array_equal(total, plain_sum(vectors, sessions))  # its input counts, its b is rebuilt by others


def test_server_view_of_one_site_is_uniform():
    """The same site's masked input for an all-zero and an all-max update: both uniform over the ring."""
    views = []
    for fill in (0, 2**31 - 1):
        _, _, sessions, server = federation(sites=3, threshold=2)
        adverts = server.collect_adverts([s.advertise() for s in sessions.values()])
        inboxes = server.route_shares({site: s.share_keys(adverts) for site, s in sessions.items()})
        vector = np.full(20000, fill, dtype=np.uint32)
        views.append(sessions[1].masked_input(inboxes[1], vector))
    for view in views:
        counts = np.bincount((view >> 28).astype(np.int64), minlength=16)  # top nibble: 16 equiprobable bins
        chi2 = float(np.sum((counts - len(view) / 16) ** 2 / (len(view) / 16)))
        assert chi2 < 45  # 15 degrees of freedom: p < 1e-4 if it were not uniform
        assert abs(float(np.mean(view.astype(np.float64))) / 2**32 - 0.5) < 0.01
    assert not np.array_equal(views[0], views[1])


def test_site_refuses_both_shares_of_one_peer():
    _, _, sessions, server = federation(sites=4, threshold=3)
    vectors = updates(sessions)
    adverts = server.collect_adverts([s.advertise() for s in sessions.values()])
    inboxes = server.route_shares({site: s.share_keys(adverts) for site, s in sessions.items()})
    survivors = server.collect_masked(
        {site: sessions[site].masked_input(inboxes[site], vectors[site]) for site in sessions}
    )
    signatures = server.collect_signatures({site: sessions[site].sign_survivors(survivors) for site in survivors})
    with pytest.raises(SecAggError, match="both kinds"):  # a cheating coordinator lists site 2 as both
        sessions[1].unmask(survivors, [2], signatures)
    with pytest.raises(SecAggError, match="both kinds|differ|stage"):
        sessions[1].unmask([1, 3, 4], [2], signatures)  # and, having failed once, the site answers no more


def test_site_refuses_survivor_list_it_did_not_sign():
    _, _, sessions, server = federation(sites=4, threshold=3)
    vectors = updates(sessions)
    adverts = server.collect_adverts([s.advertise() for s in sessions.values()])
    inboxes = server.route_shares({site: s.share_keys(adverts) for site, s in sessions.items()})
    survivors = server.collect_masked(
        {site: sessions[site].masked_input(inboxes[site], vectors[site]) for site in sessions}
    )
    signatures = server.collect_signatures({site: sessions[site].sign_survivors(survivors) for site in survivors})
    # The coordinator tells site 1 that site 2 dropped (to get site 2's mask key) while others saw it survive.
    with pytest.raises(SecAggError, match="differ"):
        sessions[1].unmask([1, 3, 4], [2], {s: signatures[s] for s in (1, 3, 4)})


def test_forged_signature_is_refused():
    keys, roster, sessions, server = federation(sites=3, threshold=2)
    adverts = {a.site: a for a in (s.advertise() for s in sessions.values())}
    impostor = ec.generate_private_key(ec.SECP256R1())  # the coordinator swaps site 2's keys for its own
    fake = SiteSession(2, impostor, {**roster, 2: impostor.public_key()}, 2, b"fed-1|round-1").advertise()
    with pytest.raises(SecAggError, match="not signed by its registered identity key"):
        sessions[1].share_keys({**adverts, 2: fake})
    assert 2 not in server.collect_adverts([adverts[1], adverts[3], fake])  # the server drops it as well


def test_signature_from_another_round_is_refused():
    keys, roster, sessions, _ = federation(sites=3, threshold=2)
    old = {s: SiteSession(s, keys[s], roster, 2, b"fed-1|round-0").advertise() for s in keys}
    fresh = {a.site: a for a in (s.advertise() for s in sessions.values())}
    with pytest.raises(SecAggError, match="not signed"):
        sessions[1].share_keys({**fresh, 3: old[3]})  # replayed keys from round 0


def test_fewer_than_threshold_aborts():
    _, _, sessions, server = federation(sites=4, threshold=3)
    vectors = updates(sessions)
    with pytest.raises(SecAggError, match="round aborted"):
        run_round(sessions, server, vectors, drop_before_input={2, 3})
    _, _, sessions, server = federation(sites=4, threshold=3)
    adverts = {a.site: a for a in (s.advertise() for s in sessions.values())}
    with pytest.raises(SecAggError, match="needed"):
        sessions[1].share_keys({1: adverts[1], 2: adverts[2]})  # a site refuses too, not only the server


def test_too_few_unmask_replies_abort():
    _, _, sessions, server = federation(sites=4, threshold=3)
    with pytest.raises(SecAggError, match="revealed shares"):
        run_round(sessions, server, updates(sessions), drop_before_unmask={1, 2})


def test_threshold_must_be_a_majority():
    _, roster, _, _ = federation(sites=4, threshold=3)
    with pytest.raises(ValueError, match="majority"):
        Aggregator(roster, 2, b"x", LENGTH)


def test_tampered_share_ciphertext_is_refused():
    _, _, sessions, server = federation(sites=3, threshold=2)
    adverts = server.collect_adverts([s.advertise() for s in sessions.values()])
    inboxes = server.route_shares({site: s.share_keys(adverts) for site, s in sessions.items()})
    blob = bytearray(inboxes[1][2])
    blob[-1] ^= 1
    with pytest.raises(SecAggError, match="tampered"):
        sessions[1].masked_input({**inboxes[1], 2: bytes(blob)}, np.zeros(LENGTH, dtype=np.uint32))


def test_session_survives_serialisation_between_stages():
    keys, roster, sessions, server = federation(sites=3, threshold=2)
    vectors = updates(sessions)
    adverts = server.collect_adverts([s.advertise() for s in sessions.values()])
    outboxes = {}
    for site in list(sessions):
        outboxes[site] = sessions[site].share_keys(adverts)
        sessions[site] = SiteSession.load(sessions[site].dump(), keys[site], roster, 2, b"fed-1|round-1")
    inboxes = server.route_shares(outboxes)
    survivors = server.collect_masked(
        {site: sessions[site].masked_input(inboxes[site], vectors[site]) for site in sessions}
    )
    signatures = server.collect_signatures({site: sessions[site].sign_survivors(survivors) for site in survivors})
    replies = [sessions[site].unmask(survivors, server.dropped, signatures) for site in survivors]
    assert np.array_equal(server.unmask(replies), plain_sum(vectors, sessions))


def test_shamir_needs_threshold_shares():
    shares = secagg.shamir_split(b"\x07" * 32, [1, 2, 3, 4, 5], 3)
    assert secagg.shamir_combine({x: shares[x] for x in (2, 4, 5)}, 3) == b"\x07" * 32
    with pytest.raises(SecAggError):
        secagg.shamir_combine({x: shares[x] for x in (1, 2)}, 3)


def uniform(view: np.ndarray) -> bool:
    counts = np.bincount((view >> 28).astype(np.int64), minlength=16)
    return float(np.sum((counts - len(view) / 16) ** 2 / (len(view) / 16))) < 45


def test_a_coordinator_marking_a_live_site_dropped_learns_nothing_of_it():
    """The whole cheat, not one refusal: site 2 is live and its masked input arrives, but the coordinator lists it
    as dropped so that the others reveal its mask key. They do (it looks like a dropout to all of them), yet its
    self mask stays hidden, since nobody reveals a b share of a site on a list of dropped sites: what the
    coordinator can strip off site 2's input leaves it uniform. Site 2, told the honest list, refuses to reveal."""
    _, _, sessions, server = federation(sites=4, threshold=3)
    vectors = {site: np.zeros(20000, dtype=np.uint32) for site in sessions}  # the easiest update to recognise
    vectors[2][:] = 12345
    adverts = server.collect_adverts([s.advertise() for s in sessions.values()])
    inboxes = server.route_shares({site: s.share_keys(adverts) for site, s in sessions.items()})
    received = {site: sessions[site].masked_input(inboxes[site], vectors[site]) for site in sessions}
    told = {site: [1, 3, 4] for site in (1, 3, 4)} | {2: [1, 2, 3, 4]}
    signatures = {site: sessions[site].sign_survivors(told[site]) for site in sessions}
    reveals = [sessions[s].unmask([1, 3, 4], [2], {x: signatures[x] for x in (1, 3, 4)}) for s in (1, 3, 4)]
    with pytest.raises(SecAggError, match="consistency signatures"):
        sessions[2].unmask([1, 2, 3, 4], [], {2: signatures[2]})
    assert all(2 not in r.b_shares for r in reveals)  # never both kinds of share for site 2
    s_private = secagg.shamir_combine({r.site: r.s_shares[2] for r in reveals}, 3)
    stripped = received[2].copy()
    for peer in (1, 3, 4):
        mask = secagg.prg(secagg._pair_seed(s_private, adverts[peer].s_public, sessions[2].context), 20000)
        stripped = stripped - mask if peer > 2 else stripped + mask
    assert np.array_equal(stripped - secagg.prg(sessions[2].self_seed, 20000), vectors[2])  # only b2 is missing
    assert uniform(stripped) and np.mean(stripped == 12345) < 0.001  # and without it: nothing of site 2's update


def test_a_coordinator_telling_sites_different_survivors_gets_no_shares_and_the_round_aborts():
    """To get both kinds of share for site 2 the coordinator must tell some sites it survived and others it
    dropped; no story then carries the threshold of consistency signatures, every site refuses, and the round
    aborts with the coordinator holding masked inputs only."""
    _, _, sessions, server = federation(sites=4, threshold=3)
    vectors = updates(sessions, seed=5)
    adverts = server.collect_adverts([s.advertise() for s in sessions.values()])
    inboxes = server.route_shares({site: s.share_keys(adverts) for site, s in sessions.items()})
    received = {site: sessions[site].masked_input(inboxes[site], vectors[site]) for site in sessions}
    server.collect_masked(received)
    told = {1: [1, 3, 4], 3: [1, 3, 4], 2: [1, 2, 3, 4], 4: [1, 2, 3, 4]}
    signatures = {site: sessions[site].sign_survivors(told[site]) for site in sessions}
    reveals = []
    for site in sessions:
        survivors = told[site]
        dropped = sorted(set(sessions) - set(survivors))
        with pytest.raises(SecAggError, match="consistency signatures"):
            reveals.append(sessions[site].unmask(survivors, dropped, signatures))
    assert reveals == []
    server.signatures = signatures
    with pytest.raises(SecAggError, match="revealed shares"):
        server.unmask(reveals)
    assert all(np.mean(received[s] == vectors[s]) < 0.05 for s in sessions)  # masked inputs, nothing in clear
