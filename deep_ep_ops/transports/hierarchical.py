"""``hierarchical``: node-aware normal mode for groups that span several nodes (DeepEP's internode mode).

Nodes are equal, contiguous blocks of ``P`` ranks (``deep_ep_ops.topology``); a rank's *forwarder* on
another node is the rank with the same local index there (its rail peer), as in DeepEP.

Dispatch (``tokens`` level), in two stages:

1. **across nodes**: a token crosses to each remote node that needs it once, to the forwarder there,
   with the positions it takes in the outputs of that node's ranks;
2. **inside the node**: every rank hands the rows of its own node's tokens, and the rows it forwards, to
   the ranks of its node that need them, which write each row straight to its final position.

The positions come from the handshake's traffic matrix (rows before each source in a receiver's output)
and the source's ``send_head``, so outputs are those of the flat path, bit for bit.

Combine reverses it: a rank returns the rows of its own node's tokens directly; rows of a remote node's
token go to the forwarder for that token's source, which sums them (fp32, rank order) and sends **one
row per (token, node)** home. The home rank adds, in node order, its own node's rows one by one and each
remote node's partial sum, accumulating in fp32 and rounding once; a partial travels in the payload's
dtype (one rounding of its own, as in DeepEP). ``deep_ep_ops.reference.combine(num_ranks_per_node=)``
defines exactly this sum. Cross-node traffic is one row per distinct (token, remote node) both ways.

Both stages move their rows with the group's own ``all_to_all`` (zero rows to the ranks a stage does not
talk to); the levels this module does not override (rows, bounded slots) are the flat ones. Bytes sent
inside and across nodes are counted (``Transport.bytes_sent``).
"""

from __future__ import annotations

import torch

from .. import _waits
from .all_to_all import AllToAllTransport
from .base import Done, Route


def unavailable(topology, group) -> str | None:
    if topology is None or topology.num_nodes < 2:
        return "the group is on one node (set num_ranks_per_node / DEEP_EP_OPS_RANKS_PER_NODE to simulate nodes)"
    return None


def _bytes(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` ``[n, ...]`` as contiguous uint8 ``[n, bytes per row]``."""
    width = rows[0:1].numel() * rows.element_size() if rows.shape[0] else \
        int(torch.Size(rows.shape[1:]).numel()) * rows.element_size()
    return rows.contiguous().view(torch.uint8).reshape(rows.shape[0], width)


class HierarchicalTransport(AllToAllTransport):
    """Two-stage normal mode over the group's collective backend (see the module docstring)."""

    name = "hierarchical"

    def __init__(self, ctx):
        super().__init__(ctx)
        t = ctx.topology
        self.per_node, self.num_nodes = t.num_ranks_per_node, t.num_nodes
        self.node, self.local = divmod(self.rank, self.per_node)

    def _wait(self, pending):
        return _waits.wait(self.ctx, pending, "hierarchical", self.ctx.seq)

    def _rail(self, node: int) -> int:
        return node * self.per_node + self.local

    def _members(self, node: int) -> range:
        return range(node * self.per_node, (node + 1) * self.per_node)

    def _exchange(self, chunks: dict[int, torch.Tensor], recv_counts: list[int], row_bytes: int) -> torch.Tensor:
        """Rows ``chunks[r]`` to rank ``r`` (none to the others), ``recv_counts[r]`` rows back from each."""
        sends = [chunks[r].shape[0] if r in chunks else 0 for r in range(self.num_ranks)]
        empty = torch.empty(0, row_bytes, dtype=torch.uint8)
        send = torch.cat([chunks.get(r, empty) for r in range(self.num_ranks)]) if chunks else empty
        return self._wait(self.all_to_all(send, sends, recv_counts))

    # --- dispatch ----------------------------------------------------------------------------------------

    def dispatch_tokens(self, rows: torch.Tensor, route: Route):
        data = _bytes(rows)
        n, width = data.shape
        in_rank, matrix, rank = route.is_token_in_rank, route.matrix, self.rank
        p = self.per_node
        # Where each (token, destination) row lands: after the rows of lower sources, at its send_head.
        before = matrix.cumsum(0) - matrix
        head = in_rank.to(torch.int64).cumsum(0) - 1
        position = torch.where(in_rank, before[rank] + head, -1).view(n, self.num_nodes, p).to(torch.int32)
        in_node = (position >= 0).any(2)  # [N, nodes]
        pos_bytes = p * 4
        # Stage 1: one row per (token, remote node), to the forwarder there, with its positions in that node.
        counts = torch.zeros(self.num_ranks, 1, dtype=torch.int64)
        chunks: dict[int, torch.Tensor] = {}
        for b in range(self.num_nodes):
            if b != self.node:
                tokens = in_node[:, b].nonzero().flatten()
                chunks[self._rail(b)] = torch.cat([self.kernels.gather_rows(data, tokens),
                                                   position[tokens, b].view(torch.uint8)], dim=1)
                counts[self._rail(b)] = tokens.numel()
        ones = [1] * self.num_ranks
        incoming = self._wait(self.all_to_all(counts, ones, ones)).view(-1).tolist()
        forwarded = self._exchange(chunks, [incoming[r] if r != rank else 0 for r in range(self.num_ranks)],
                                   width + pos_bytes)
        # Stage 2: this node's own tokens and the forwarded rows, to the ranks of this node that need them.
        own = in_node[:, self.node].nonzero().flatten()
        rows_here = torch.cat([torch.cat([self.kernels.gather_rows(data, own),
                                          position[own, self.node].view(torch.uint8)], dim=1), forwarded])
        targets = rows_here[:, width:].contiguous().view(torch.int32)  # [m, P]
        chunks = {}
        for j, r in enumerate(self._members(self.node)):
            pick = (targets[:, j] >= 0).nonzero().flatten()
            chunks[r] = torch.cat([rows_here[pick, :width], targets[pick, j:j + 1].contiguous().view(torch.uint8)],
                                  dim=1)
        # Rows a rank of this node delivers to rank r: those of each source whose rows it carries into this
        # node (itself, and the sources on other nodes for which it is the forwarder).
        delivered = [int(sum(matrix[s, rank] for s in self._carried_by(q))) for q in range(self.num_ranks)]
        received = self._exchange(chunks, delivered, width + 4)
        out = self.outputs.empty((sum(route.counts()[1]), width), torch.uint8)
        self.kernels.scatter_rows(out, received[:, width:].contiguous().view(torch.int32).view(-1).long(),
                                  received[:, :width])
        return Done(out.view(rows.dtype).view(out.shape[0], *rows.shape[1:]))

    def _carried_by(self, q: int) -> list[int]:
        """Sources whose rows rank ``q`` hands to the ranks of its node: itself, and for each other node the
        source with ``q``'s local index (``q`` is its forwarder). Empty when ``q`` is on another node."""
        if q // self.per_node != self.node:
            return []
        return [q] + [b * self.per_node + q % self.per_node for b in range(self.num_nodes) if b != self.node]

    # --- combine -----------------------------------------------------------------------------------------

    def combine_tokens(self, rows: torch.Tensor, route: Route, bias=(), out_dtype=None):
        dtype = rows.dtype if out_dtype is None else out_dtype
        matrix, rank, p = route.matrix, self.rank, self.per_node
        width = rows.shape[1]
        # The (source, token) of every row here, from the dispatch: rows come grouped by source rank.
        source = torch.repeat_interleave(torch.arange(self.num_ranks), matrix[:, rank])
        token = route.recv_src_idx.long()
        source_node = torch.div(source, p, rounding_mode="floor")
        home = source_node == self.node
        # Back inside the node: rows of this node's tokens to their source; the others to the forwarder of
        # their source on this node, with (source, token).
        meta = torch.stack([source, token], dim=1).to(torch.int32).view(torch.uint8)
        tagged = torch.cat([_bytes(rows), meta], dim=1)
        chunks = {}
        for j, r in enumerate(self._members(self.node)):
            direct = (home & (source == r)).nonzero().flatten()
            via = (~home & (source % p == j)).nonzero().flatten()
            chunks[r] = tagged[torch.cat([direct, via])]
        # Rank q of this node sends here the rows of this rank's tokens it got, then those it forwards for me.
        expect = [int(matrix[rank, q]) + int(sum(matrix[s, q] for s in range(self.num_ranks)
                                                 if s // p != self.node and s % p == self.local))
                  if q // p == self.node else 0 for q in range(self.num_ranks)]
        got = self._exchange(chunks, expect, tagged.shape[1])
        row_bytes = tagged.shape[1] - 8
        got_meta = got[:, row_bytes:].contiguous().view(torch.int32).view(-1, 2).long()
        got_rows = got[:, :row_bytes].contiguous().view(rows.dtype).view(-1, width)
        mine = got_meta[:, 0] == rank
        # As forwarder: one partial sum per (remote source, token), over this node's ranks in rank order.
        fwd = (~mine).nonzero().flatten()
        key = got_meta[fwd, 0] * (1 << 32) + got_meta[fwd, 1]
        unique, slot = torch.unique(key, sorted=True, return_inverse=True)
        partial = self.kernels.combine_reduce(got_rows[fwd], slot, unique.numel(), out_dtype=rows.dtype)
        partial_source = torch.div(unique, 1 << 32, rounding_mode="floor")
        chunks = {}
        for b in range(self.num_nodes):
            if b != self.node:
                pick = (partial_source == self._rail(b)).nonzero().flatten()
                chunks[self._rail(b)] = torch.cat([_bytes(partial[pick]),
                                                   (unique[pick] % (1 << 32)).to(torch.int32).view(-1, 1)
                                                   .view(torch.uint8)], dim=1)
        # From each remote node: one partial per token of mine that went there.
        per_node = route.is_token_in_rank.view(-1, self.num_nodes, p).any(2).sum(0).tolist()
        partials = self._exchange(chunks, [per_node[r // p] if r // p != self.node and r % p == self.local else 0
                                           for r in range(self.num_ranks)], row_bytes + 4)
        # Home: in node order, this node's rows rank by rank, and each remote node's partial.
        sums, tokens = [], []
        partial_node = torch.repeat_interleave(
            torch.arange(self.num_nodes),
            torch.tensor([per_node[b] if b != self.node else 0 for b in range(self.num_nodes)]))
        partial_rows = partials[:, :row_bytes].contiguous().view(rows.dtype).view(-1, width)
        partial_token = partials[:, row_bytes:].contiguous().view(torch.int32).view(-1).long()
        members = torch.tensor(list(self._members(self.node)))
        direct_source = torch.repeat_interleave(members, matrix[rank, members])
        direct_rows, direct_token = got_rows[mine], got_meta[mine, 1]
        for b in range(self.num_nodes):
            if b == self.node:
                for q in self._members(b):
                    pick = (direct_source == q).nonzero().flatten()
                    sums.append(direct_rows[pick])
                    tokens.append(direct_token[pick])
            else:
                pick = (partial_node == b).nonzero().flatten()
                sums.append(partial_rows[pick])
                tokens.append(partial_token[pick])
        num_tokens = route.is_token_in_rank.shape[0]
        return Done(self.kernels.combine_reduce(torch.cat(sums), torch.cat(tokens), num_tokens, *bias,
                                                out_dtype=dtype))
