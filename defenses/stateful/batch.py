"""MemoryStore's vectorised path: a batch of queries of several clients scored and recorded in a
few numpy calls instead of a few dozen per query.

The reference rule is sequential (defenses/stateful/store.py: each query scored against every
query before it, then recorded). Within one batch, query ``i`` sees the store as it was before the
batch plus the postings that the batch's earlier queries wrote. This module computes the same
scores and leaves the same state as the one-query-at-a-time loop (``MemoryStore._observe``), and
gives up (returns None, and the caller runs that loop) whenever an earlier query of the batch
could change what a later one reads other than by the two effects it models exactly:

- **in-batch retries**: a digest sent earlier in the batch by the same client;
- **in-batch holders**: a later query looking up an index slot (bucket, tag) that an earlier query
  of the batch wrote reads that query's entry (a near-copy matching its predecessor -- the attack
  case -- is exactly this).

It gives up when (each rare on a store sized for its load, checked by the equality tests in
tests/defenses/test_stateful_store.py): a client appears twice; the sequence number would wrap; the
batch exceeds ``max_entries`` or a client's part exceeds ``max_per_client``; an entry that is live
at the start of the batch could fall out of the bounds during it; a digest lookup hits a slot that
an earlier query of the batch writes (other than the same client's same digest); a lookup that
finds a live entry sits in a bucket where an earlier query of the batch writes a new tag (which
may evict it); a bucket receives more than ``WAYS`` distinct slots from the batch.
"""

from __future__ import annotations

import numpy as np

from robustgate.defenses.stateful.store import _DIGEST_DOMAIN, _MIX, WAYS, MemoryStore


def _runs_prev(keys: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For items with slot ``keys`` [M] (int64) and query index ``order`` [M]: per item, the position
    (into the inputs) of an item with the same key and the largest order below its own, or -1."""
    idx = np.lexsort((order, keys))  # by key, then order
    k, o = keys[idx], order[idx]
    m = k.size
    new_run = np.ones(m, dtype=bool)  # first item of each run of equal (key, order)
    new_run[1:] = (k[1:] != k[:-1]) | (o[1:] != o[:-1])
    start = np.maximum.accumulate(np.where(new_run, np.arange(m), 0))  # each item's run start
    prev = start - 1
    ok = (prev >= 0) & (k[np.maximum(prev, 0)] == k)
    out = np.full(m, -1, dtype=np.int64)
    out[idx] = np.where(ok, idx[np.maximum(prev, 0)], -1)
    return out


def observe_vectorised(store: MemoryStore, recs: list[list[int]], groups: list[tuple[str, np.ndarray, np.ndarray]],
                       now: float) -> list[np.ndarray] | None:
    """Scores and records ``groups`` (``[(client, digests [N_c], hashes [N_c, k])]``, ``recs`` their
    ``[client id, queries recorded]``) like ``MemoryStore._observe`` group after group, or returns
    None without touching the store when it cannot promise the same result (module docstring)."""
    st = store
    sizes = [d.shape[0] for _, d, _ in groups]
    n = sum(sizes)
    if len({id(r) for r in recs}) < len(recs) or n > st.max_entries or max(sizes) > st.max_per_client:
        return None
    if st._seq + n > 0xFFFFFFFF:
        return None
    k = groups[0][2].shape[1]
    if any(h.shape[1] != k for _, _, h in groups):
        return None
    # 1. the batch flattened in processing order: query q of group g[q]
    dig = np.concatenate([d for _, d, _ in groups])  # [N] uint64
    hsh = np.concatenate([h for _, _, h in groups])  # [N, k] uint64
    g = np.repeat(np.arange(len(groups)), sizes)  # [N]
    cid = np.array([r[0] for r in recs], dtype=np.uint32)[g]  # [N]
    count0 = np.array([r[1] for r in recs], dtype=np.int64)[g]  # [N]
    mix = (cid.astype(np.uint64) * np.uint64(_MIX))  # [N], mod 2**64 like the loop's
    # 2. every lookup slot: columns 0..k-1 the hashes (0 = none), column k the digest
    keys = np.empty((n, k + 1), dtype=np.uint64)
    np.bitwise_xor(hsh, mix[:, None], out=keys[:, :k])
    keys[:, k] = dig ^ _DIGEST_DOMAIN ^ mix
    valid = np.ones((n, k + 1), dtype=bool)
    valid[:, :k] = hsh != 0
    b, t = st._locate(keys.reshape(-1))
    b, t = b.reshape(n, k + 1), t.reshape(n, k + 1)
    # 3. what the store held before the batch: the ways with the tag, and whether they are live
    match = (st._tags[b] == t[..., None]) & valid[..., None]  # [N, k+1, WAYS]
    mq, mc, mw = np.nonzero(match)  # the few matching ways: only they are read from the other arrays
    ms = st._p_seq[b[mq, mc], mw]  # [M] their entries' sequence numbers
    mslot = ms & np.uint32(st._cap - 1)
    age0 = (np.uint32(st._seq) - ms).astype(np.int64)
    behind = count0[mq] - st._e_cidx[mslot].astype(np.int64)
    ok = ((st._e_seq[mslot] == ms) & (st._e_client[mslot] == cid[mq]) & (ms != 0)
          & (now - st._e_time[mslot] <= st.ttl_s) & (age0 < st.max_entries) & (behind <= st.max_per_client))
    n_g = np.asarray(sizes, dtype=np.int64)[g[mq]]
    if (ok & ((age0 + n - 1 >= st.max_entries) | (behind + n_g - 1 > st.max_per_client))).any():
        return None  # an entry could fall out of the bounds during the batch
    live0 = np.zeros(match.shape, dtype=bool)
    live0[mq[ok], mc[ok], mw[ok]] = True
    seqs = np.zeros(match.shape, dtype=np.uint32)  # [N, k+1, WAYS] the live ways' entries (0 elsewhere)
    seqs[mq[ok], mc[ok], mw[ok]] = ms[ok]
    e_digest = np.zeros(match.shape[0::2], dtype=np.uint64)  # [N, WAYS] the digest column's entries' digests
    dsel = ok & (mc == k)
    e_digest[mq[dsel], mw[dsel]] = st._e_digest[mslot[dsel]]
    order = np.repeat(np.arange(n), k + 1).reshape(n, k + 1)
    slot = (b << 16) | t.astype(np.int64)  # [N, k+1] one integer per (bucket, tag)
    # the common serving case, one query per client, each in buckets no other query of the batch
    # touches: no query can see another's effects, and steps 4, 5 and 7's in-batch part are moot
    hit = np.zeros(n, dtype=bool)
    disjoint = False
    if len(groups) == n:
        vb = b[valid]
        disjoint = np.unique(vb).size == np.unique(order[valid] * st._buckets + vb).size
    if not disjoint:
        # 4. slots written earlier in the batch (conservatively by every query): digest lookups must not hit them
        fv = np.flatnonzero(valid.reshape(-1))
        p = _runs_prev(slot.reshape(-1)[fv], order.reshape(-1)[fv])
        prev_all = np.full(n * (k + 1), -1, dtype=np.int64)
        prev_all[fv] = np.where(p >= 0, fv[np.maximum(p, 0)], -1)  # flattened position of the earlier writer
        pd = prev_all.reshape(n, k + 1)[:, k]  # the digest column's earlier writer (flattened position) or -1
        hit = pd >= 0
        if hit.any():
            pq, pc = np.divmod(pd[hit], k + 1)
            same = (pc == k) & (g[pq] == g[hit]) & (dig[pq] == dig[hit])
            if not same.all():
                return None
        # 5. new tags (absent before the batch) written into a bucket where a later lookup found a live entry
        new_tag = valid & ~match.any(-1)  # [N, k+1]
        found = live0.any(-1)  # [N, k+1]
        if new_tag.any() and found.any():
            nb, first = np.unique(b[new_tag], return_index=True)  # flattened order is query order
            first_q = order[new_tag][first]
            fb, fq = b[found], order[found]
            at = np.minimum(np.searchsorted(nb, fb), nb.size - 1)
            if ((nb[at] == fb) & (first_q[at] < fq)).any():
                return None
    # 6. retries: the same client's digest earlier in the batch, or a live stored entry with it
    dup = np.zeros(n, dtype=bool)
    if hit.any():
        dup[hit] = True  # step 4 left only the same client's same digest
    stored = (live0[:, k] & (e_digest == dig[:, None])).any(-1)
    recorded = ~(dup | stored)
    r_global = np.cumsum(recorded) - recorded  # recorded queries before each one
    new_seq = (st._seq + 1 + r_global).astype(np.uint32)  # each recorded query's sequence number
    # 7. hash lookups of recorded queries: the latest recorded writer of the slot in the batch, else the store
    rmask = valid & recorded[:, None]  # [N, k+1] postings written (and lookups made) by recorded queries
    prev = np.full((n, k + 1), -1, dtype=np.int64)
    if rmask.any() and not disjoint:
        pos = np.flatnonzero(rmask.reshape(-1))
        p = _runs_prev(slot.reshape(-1)[pos], order.reshape(-1)[pos])
        prev.reshape(-1)[pos] = np.where(p >= 0, pos[np.maximum(p, 0)] // (k + 1), -1)  # writer query or -1
    look = rmask.copy()
    look[:, k] = False  # digest columns are not counted
    pairs_q, pairs_s = [], []
    inb = look & (prev >= 0)
    if inb.any():
        wq, lq = prev[inb], order[inb]
        keep = g[wq] == g[lq]  # another client's entry is never live for this one
        pairs_q.append(lq[keep])
        pairs_s.append(new_seq[wq[keep]].astype(np.int64))
    outb = look & (prev < 0)
    if outb.any():
        cand = live0 & outb[..., None]  # [N, k+1, WAYS]
        pairs_q.append(np.broadcast_to(order[..., None], cand.shape)[cand])
        pairs_s.append(seqs[cand].astype(np.int64))
    scores = np.zeros(n, dtype=np.int64)
    if pairs_q:
        pq_all, ps_all = np.concatenate(pairs_q), np.concatenate(pairs_s)
        if pq_all.size:
            uniq, counts = np.unique(pq_all * (1 << 32) + ps_all, return_counts=True)
            np.maximum.at(scores, uniq >> 32, counts)
    # 8. postings: per slot its last recorded writer; more than WAYS slots in one bucket -> give up
    if rmask.any():
        pos = np.flatnonzero(rmask.reshape(-1))
        s_slot = slot.reshape(-1)[pos]
        s_q = order.reshape(-1)[pos]
        uslot, first_i, inv = np.unique(s_slot, return_index=True, return_inverse=True)
        last_q = np.full(uslot.size, -1, dtype=np.int64)
        np.maximum.at(last_q, inv, s_q)
        ub = uslot >> 16
        ut = (uslot & 0xFFFF).astype(np.uint16)
        by = np.lexsort((pos[first_i], ub))  # by bucket, then first write (query, then column: the loop's order)
        ub, ut, useq = ub[by], ut[by], new_seq[last_q[by]]
        rank = np.arange(ub.size) - np.searchsorted(ub, ub)  # position among its bucket's slots
        if rank.size and rank.max() >= WAYS:
            return None
    # 9. commit: entries, client counts, sequence, postings (round r = each bucket's r-th new slot)
    rq = np.flatnonzero(recorded)
    if rq.size:
        eslot = new_seq[rq] & np.uint32(st._cap - 1)
        st._e_seq[eslot], st._e_client[eslot] = new_seq[rq], cid[rq]
        starts = np.repeat(np.cumsum(sizes) - np.asarray(sizes), sizes)  # [N] each query's group start
        r_group = r_global - r_global[starts]  # recorded before it in its own group
        st._e_cidx[eslot] = (count0[rq] + r_group[rq]).astype(np.uint32)
        st._e_time[eslot], st._e_digest[eslot] = now, dig[rq]
        for rec, added in zip(recs, np.bincount(g[rq], minlength=len(groups)).tolist()):
            rec[1] += added
        st._inserted += int(rq.size)
        st._seq = int(new_seq[rq[-1]])
        for r in range(int(rank.max()) + 1):
            sel = rank == r
            st._write(ub[sel], ut[sel], useq[sel], ref=new_seq[rq[-1]])
    out, at = [], 0
    for size in sizes:
        out.append(scores[at:at + size])
        at += size
    return out
