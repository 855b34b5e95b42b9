"""Byte sizes of the built-in tiny Llama (models/build_tiny.py defaults) that tests assert against."""

#: Its float32 weights (every parameter once), bytes.
WEIGHTS = 28_582_912
#: Its linear weights (lm_head 8192 x 256; per layer qkv 384 x 256, o 256 x 256, gate_up
#: 1408 x 256, down 256 x 704), float32 bytes: on CPU the engine also holds a oneDNN-packed copy of
#: each, at least this large (the blocked layout may pad, depending on the CPU's instruction set).
LINEAR_WEIGHTS = 4 * (8192 * 256 + 4 * (384 * 256 + 256 * 256 + 1408 * 256 + 256 * 704))
#: One KV block, bytes: 2 (K, V) x 4 layers x 16 tokens x 2 KV heads x 64 dims x 4 B.
BLOCK = 64 * 1024
