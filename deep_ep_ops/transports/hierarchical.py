"""``hierarchical``: node-aware normal mode for groups that span several nodes (DeepEP's internode mode).

Nodes are equal, contiguous blocks of ``P`` ranks (``deep_ep_ops.topology``). A token's *forwarder* on a
node is that node's rank ``t % P`` (``t`` the token's index at its source), both ways. DeepEP forwards
through rail peers (same local index), which suits RDMA rails; over TCP that leaves one flow per pair of
ranks across nodes, and spreading tokens over the node's ranks fills the link better (dispatch of 4096 x 7168
bf16 rows on 2 x 2 simulated hosts at 1 Gbit/s: 1.5-1.6 s through rail peers, 1.3-1.5 s spread).

Dispatch (``tokens`` level), in two stages:

1. **across nodes**: a token crosses to each remote node that needs it once, to the forwarder there,
   with the positions it takes in the outputs of that node's ranks;
2. **inside the node**: every rank hands the rows of its own node's tokens, and the rows it forwards, to
   the ranks of its node that need them, which write each row straight to its final position.

The positions come from the handshake's traffic matrix (rows before each source in a receiver's output)
and the source's ``send_head``, so outputs are those of the flat path, bit for bit.

Combine reverses it: a rank returns the rows of its own node's tokens directly; rows of a remote node's
token go to this node's forwarder of that token, which sums them (fp32, rank order) and sends **one
row per (token, node)** home. The home rank adds, in node order, its own node's rows one by one and each
remote node's partial sum, accumulating in fp32 and rounding once; a partial travels in the payload's
dtype (one rounding of its own, as in DeepEP). ``deep_ep_ops.reference.combine(num_ranks_per_node=)``
defines exactly this sum. Cross-node traffic is one row per distinct (token, remote node) both ways.

The cross-node stage moves its rows with the group's own ``all_to_all`` (zero rows to the ranks it does
not talk to). The stages inside a node use the ``shm`` backend on a subgroup of the node's ranks when the
tensors are on CPU (the node's ranks share a host by definition), else the group's ``all_to_all`` too: over
gloo that would be TCP through the host's own network stack, several times the cost of a copy. The levels
this module does not override (rows, bounded slots) are the flat ones. Bytes sent inside and across nodes
are counted (``Transport.bytes_sent``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

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
        self._node_ctx = self._node_context()

    def _node_context(self):
        """The ``shm`` context of this node's ranks (a subgroup only they create), or ``None`` (one rank per
        node, or tensors that live on a device)."""
        if self.per_node == 1 or self.device.type != "cpu":
            return None
        from .. import _registry  # the registry builds transports: import it only once it is loaded

        members = [dist.get_global_rank(self.group, q) for q in self._members(self.node)]
        group = dist.new_group(members, use_local_synchronization=True)
        return _registry.node_context(group, self.ctx, "shm")

    def close(self) -> None:
        if self._node_ctx is not None:
            self._node_ctx.transport.close()
            self._node_ctx = None
        super().close()

    def _wait(self, pending, ctx=None):
        return _waits.wait(ctx or self.ctx, pending, getattr(self.ctx, "op", None) or "hierarchical", self.ctx.seq)

    def _members(self, node: int) -> range:
        return range(node * self.per_node, (node + 1) * self.per_node)

    def _start(self, chunks: dict[int, list], meta: dict[int, torch.Tensor], recv_counts: list[int],
               width: int, meta_width: int, in_node: bool = False) -> tuple:
        """Starts sending rank ``r`` the rows ``chunks[r]`` (pairs ``(rows, index)``: ``rows[index]``, uint8
        ``[n, width]``) with one int32 ``[meta_width]`` record each (``meta[r]``); none to the others.
        :meth:`_finish` returns the rows (uint8 ``[Σ recv_counts, width]``) and records (int32
        ``[…, meta_width]``) from every rank in rank order.

        Rows are copied once, straight into the send buffer; records travel in a second, small exchange
        (gluing them onto the rows would cost two more copies of the payload). With ``in_node`` (every rank
        of the exchange on this node) the exchange runs on the node's ``shm`` context when there is one."""
        sends = [sum(index.numel() for _, index in chunks.get(r, ())) for r in range(self.num_ranks)]
        send = self.outputs.empty((sum(sends), width), torch.uint8)
        offset = 0
        for r in range(self.num_ranks):
            for rows, index in chunks.get(r, ()):
                self.kernels.gather_rows_into(send[offset:offset + index.numel()], rows, index)
                offset += index.numel()
        records = torch.cat([meta[r] for r in range(self.num_ranks) if r in meta]) if meta else \
            torch.empty(0, meta_width, dtype=torch.int32)
        node = self._node_ctx if in_node else None
        if node is None:
            return (self.all_to_all(send, sends, recv_counts),
                    self.all_to_all(records.view(-1, meta_width), sends, recv_counts), None)
        self.count(sends, width)
        local = self._members(self.node)
        sends, recv_counts = sends[local.start:local.stop], recv_counts[local.start:local.stop]
        return (node.transport.all_to_all(send, sends, recv_counts),
                node.transport.all_to_all(records.view(-1, meta_width), sends, recv_counts), node)

    def _finish(self, pending: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        return self._wait(pending[0], pending[2]), self._wait(pending[1], pending[2])

    def _in_node(self, counts) -> list[int]:
        """``counts(q)`` for the ranks ``q`` of this node, 0 for the others."""
        return [int(counts(q)) if q // self.per_node == self.node else 0 for q in range(self.num_ranks)]

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
        # Stage 1: one row per (token, remote node), to the forwarder there, with its positions in that node.
        chunks, meta = {}, {}
        forwarder = torch.arange(n) % p  # token t goes to rank t % P of each remote node: P flows per node pair
        for b in range(self.num_nodes):
            if b != self.node:
                for j, r in enumerate(self._members(b)):
                    tokens = (in_node[:, b] & (forwarder == j)).nonzero().flatten()
                    chunks[r], meta[r] = [(data, tokens)], position[tokens, b]
        across = self._start(chunks, meta, self._incoming(chunks), width, p)
        # Stage 2, while stage 1 is on the wire: this node's own tokens to the ranks of this node that need them.
        out = self.outputs.empty((sum(route.counts()[1]), width), torch.uint8)
        own = in_node[:, self.node].nonzero().flatten()
        own_at = position[own, self.node]
        chunks, meta = {}, {}
        for j, r in enumerate(self._members(self.node)):
            pick = (own_at[:, j] >= 0).nonzero().flatten()
            chunks[r], meta[r] = [(data, own[pick])], own_at[pick, j].view(-1, 1)
        received, received_at = self._finish(self._start(chunks, meta, self._in_node(lambda q: matrix[q, rank]),
                                                         width, 1, in_node=True))
        self.kernels.scatter_rows(out, received_at.view(-1).long(), received)
        # Then the rows that came from other nodes, to the ranks of this node that need them.
        forwarded, forwarded_at = self._finish(across)
        chunks, meta = {}, {}
        for j, r in enumerate(self._members(self.node)):
            pick = (forwarded_at[:, j] >= 0).nonzero().flatten()
            chunks[r], meta[r] = [(forwarded, pick)], forwarded_at[pick, j].view(-1, 1)
        received, received_at = self._finish(self._start(chunks, meta, self._incoming(chunks), width, 1,
                                                         in_node=True))
        self.kernels.scatter_rows(out, received_at.view(-1).long(), received)
        return Done(out.view(rows.dtype).view(out.shape[0], *rows.shape[1:]))

    def _incoming(self, chunks: dict[int, list]) -> list[int]:
        """The rows each rank sends here in an exchange where this rank sends ``chunks`` (a small exchange of
        counts over the whole group)."""
        counts = torch.zeros(self.num_ranks, 1, dtype=torch.int64)
        for r, pieces in chunks.items():
            counts[r] = sum(index.numel() for _, index in pieces)
        ones = [1] * self.num_ranks
        return self._wait(self.all_to_all(counts, ones, ones)).view(-1).tolist()

    # --- combine -----------------------------------------------------------------------------------------

    def combine_tokens(self, rows: torch.Tensor, route: Route, bias=(), out_dtype=None):
        dtype = rows.dtype if out_dtype is None else out_dtype
        matrix, rank, p = route.matrix, self.rank, self.per_node
        width = rows.shape[1]
        data = _bytes(rows)
        row_bytes = data.shape[1]
        # The (source, token) of every row here, from the dispatch: rows come grouped by source rank.
        source = torch.repeat_interleave(torch.arange(self.num_ranks), matrix[:, rank])
        token = route.recv_src_idx.long()
        home = torch.div(source, p, rounding_mode="floor") == self.node
        tags = torch.stack([source, token], dim=1).to(torch.int32)
        # Inside the node first: rows of remote nodes' tokens to this node's forwarder of the token (rank t % P,
        # as in the dispatch).
        chunks, meta = {}, {}
        for j, r in enumerate(self._members(self.node)):
            pick = (~home & (token % p == j)).nonzero().flatten()
            chunks[r], meta[r] = [(data, pick)], tags[pick]
        got, got_meta = self._finish(self._start(chunks, meta, self._incoming(chunks), row_bytes, 2,
                                                 in_node=True))
        got_meta = got_meta.long()
        # As forwarder: one partial sum per (remote source, token), over this node's ranks in rank order.
        key = got_meta[:, 0] * (1 << 32) + got_meta[:, 1]
        unique, slot = torch.unique(key, sorted=True, return_inverse=True)
        partial = self.kernels.combine_reduce(got.view(rows.dtype).view(-1, width), slot, unique.numel(),
                                              out_dtype=rows.dtype)
        partial_source = torch.div(unique, 1 << 32, rounding_mode="floor")
        partial_token = (unique % (1 << 32)).to(torch.int32).view(-1, 1)
        chunks, meta = {}, {}
        for r in range(self.num_ranks):
            if r // p != self.node:
                pick = (partial_source == r).nonzero().flatten()
                chunks[r], meta[r] = [(_bytes(partial), pick)], partial_token[pick]
        # From each remote node's forwarder j: one partial per token t of mine that went there, t % P == j.
        num_tokens = route.is_token_in_rank.shape[0]
        in_node = route.is_token_in_rank.view(-1, self.num_nodes, p).any(2)
        mine = torch.arange(num_tokens) % p
        across_counts = [int((in_node[:, r // p] & (mine == r % p)).sum()) if r // p != self.node else 0
                         for r in range(self.num_ranks)]
        across = self._start(chunks, meta, across_counts, row_bytes, 1)
        # While the partials are on the wire: rows of this node's tokens back to their source.
        chunks, meta = {}, {}
        for r in self._members(self.node):
            pick = (home & (source == r)).nonzero().flatten()
            chunks[r], meta[r] = [(data, pick)], tags[pick, 1:]
        direct, direct_token = self._finish(self._start(chunks, meta, self._in_node(lambda q: matrix[rank, q]),
                                                        row_bytes, 1, in_node=True))
        partials, partial_at = self._finish(across)
        # Home: in node order, this node's rows rank by rank (as received), and each remote node's partial.
        partial_node = torch.div(torch.repeat_interleave(
            torch.arange(self.num_ranks), torch.tensor(across_counts)), p, rounding_mode="floor")
        direct_rows, partial_rows = direct.view(rows.dtype).view(-1, width), partials.view(rows.dtype).view(-1, width)
        order, tokens = [], []
        for b in range(self.num_nodes):
            if b == self.node:
                order.append((direct_rows, torch.arange(direct_rows.shape[0])))
                tokens.append(direct_token.view(-1).long())
            else:
                pick = (partial_node == b).nonzero().flatten()
                order.append((partial_rows, pick))
                tokens.append(partial_at[pick, 0].long())
        summands = self.outputs.empty((sum(t.numel() for t in tokens), width), rows.dtype)
        offset = 0
        for source_rows, pick in order:
            self.kernels.gather_rows_into(summands[offset:offset + pick.numel()], source_rows, pick)
            offset += pick.numel()
        return Done(self.kernels.combine_reduce(summands, torch.cat(tokens), num_tokens, *bias, out_dtype=dtype))
