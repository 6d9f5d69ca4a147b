"""The demo model: a tiny gpt-oss trained by the project on synthetic harmony conversations.

`world` (what it knows) → `conversations` (rendered training pairs) → `vocab` (the tokens used) →
`trainable` (the architecture with gradients) → `train` (the loop) → `export` (the compact file that
`ossrun.model.demo_weights` expands into a full checkpoint) → `evaluate` (greedy answers through
the real model). `ossrun train-demo` runs them all.
"""
