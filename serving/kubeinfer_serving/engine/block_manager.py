"""Paged KV cache bookkeeping: fixed-size blocks, per-sequence block tables, prefix caching.

Design after vLLM's PagedAttention (Kwon et al., SOSP 2023, "Efficient Memory Management for
Large Language Model Serving with PagedAttention") and vLLM v1's prefix cache: a full block is
named by a chained hash of (parent block hash, its tokens), so equal hashes mean equal
prefixes. Freed blocks keep their hash and go to the tail of an LRU free queue; a later
request with the same prefix takes them back, and allocation evicts from the head (least
recently freed first, unhashed blocks before hashed ones).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq

from .sequence import Sequence


def salt_root(cache_salt: str | None) -> bytes | None:
    """The parent hash of a sequence's first block: None unsalted, else a hash of the salt.

    As vLLM's ``cache_salt``: mixing a per-tenant salt into the first block's hash (and so,
    through the chain, into every block's) makes blocks of different salts never match, so one
    tenant cannot detect another's prompts through prefix-cache hits.
    """
    if cache_salt is None:
        return None
    return hashlib.sha256(b"kubeinfer-cache-salt\x00" + cache_salt.encode("utf-8", "surrogatepass")).digest()


def seq_root(seq: Sequence) -> bytes | None:
    """The parent hash of ``seq``'s first block: its cache salt (:func:`salt_root`) and its LoRA
    adapter's digest, so blocks computed under an adapter never serve the base model or
    another adapter (their K/V differ). None for an unsalted base-model sequence."""
    root = salt_root(seq.params.cache_salt)
    if seq.lora is None:
        return root
    return hashlib.sha256(b"kubeinfer-lora\x00" + (root or b"") + seq.lora.digest).digest()


def hash_block(parent: bytes | None, token_ids: Seq[int]) -> bytes:
    """Chained hash of one full block: SHA-256 over the parent's hash and the block's token ids.

    Args:
        parent: the previous block's hash, None for the first block.
        token_ids: the block's ``block_size`` token ids.

    Returns:
        32-byte digest. SHA-256 makes accidental collisions (which would silently reuse the
        wrong K/V) practically impossible, unlike Python's 64-bit ``hash``.
    """
    h = hashlib.sha256(parent or b"\x00")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    """Allocates and frees KV blocks for sequences; owns the prefix cache index.

    Args:
        num_blocks: pool size in blocks.
        block_size: tokens per block.
        enable_prefix_caching: register full blocks by hash and reuse them.

    Invariants: a block is either referenced (ref_count > 0, not in the free queue) or free
    (ref_count == 0, in the free queue); a free block may still hold a hash (cached-free).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references (cached-free blocks included: they can be evicted)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by sequences, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> tuple[list[int], list[bytes]]:
        """Find the longest run of leading full blocks of ``seq`` already in the cache.

        At least one token is always left to compute (its logits pick the next token), so a
        prompt that is entirely cached matches one block less.

        Returns:
            (block ids, their hashes), not yet referenced; pass both to :meth:`allocate_slots`.
        """
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return [], []  # a request scoring its prompt needs the logits of every prompt token
        max_blocks = (len(seq) - 1) // self.block_size
        blocks: list[int] = []
        hashes: list[bytes] = []
        parent = seq_root(seq)
        bs = self.block_size
        for i in range(max_blocks):
            h = hash_block(parent, seq.tokens_slice(i * bs, (i + 1) * bs))
            block = self._cached.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def allocate_slots(
        self,
        seq: Sequence,
        num_new_tokens: int,
        computed_blocks: Seq[int] = (),
        computed_hashes: Seq[bytes] = (),
    ) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``seq`` (all or nothing).

        Args:
            seq: the sequence; its ``block_table`` grows in place.
            num_new_tokens: tokens to be computed this step, after ``seq.num_computed_tokens``.
            computed_blocks / computed_hashes: prefix-cache hits from :meth:`match_prefix`, only
                for a sequence without blocks; on success they lead its block table and
                ``seq.num_computed_tokens`` becomes their token count.

        Returns:
            False (nothing changed) when the free pool is too small.
        """
        if computed_blocks and seq.block_table:
            raise ValueError("prefix-cache hits can only start an empty block table")
        num_computed = len(computed_blocks) * self.block_size if computed_blocks else seq.num_computed_tokens
        table_len = len(computed_blocks) if computed_blocks else len(seq.block_table)
        needed = self.num_blocks_for(num_computed + num_new_tokens) - table_len
        # Hits on cached-free blocks take them out of the free queue too.
        hits_from_free = sum(1 for b in computed_blocks if self.ref_counts[b] == 0)
        if max(needed, 0) + hits_from_free > len(self._free):
            return False
        for b in computed_blocks:
            self._touch(b)
        if computed_blocks:
            seq.block_table = list(computed_blocks)
            seq.block_hashes = list(computed_hashes)
            seq.num_computed_tokens = num_computed
        for _ in range(needed):
            seq.block_table.append(self._pop_free())
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of ``seq``'s blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else seq_root(seq)
            h = hash_block(parent, seq.tokens_slice(i * bs, (i + 1) * bs))
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self._cached and self.block_hash[block] is None:
                self._cached[h] = block
                self.block_hash[block] = h

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references to its blocks and clear its table.

        Blocks whose count drops to 0 join the free queue: unhashed ones at the head (reused
        first), hashed ones at the tail, last block first, so a prompt's leading blocks,
        the ones most worth keeping, are evicted last.
        """
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None
                if self.block_hash[b] is None:
                    self._free.move_to_end(b, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _touch(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1

    def _pop_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:
            if self._cached.get(h) == block:
                del self._cached[h]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block
