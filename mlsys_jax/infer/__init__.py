"""mlsys_jax.infer: inference-time transforms of a trained model.

Each system lives in its own module and is imported from it:

- ``mlsys_jax.infer.sensai``: sensAI class-parallel subnets (Wang et al., MLSys 2021): class grouping, APoZ
  pruning as pytree surgery, one-vs-rest retraining, combination, vmapped / sharded ensembles.
- ``mlsys_jax.infer.microrec``: MicroRec (Jiang et al., MLSys 2021): Cartesian combination of embedding
  tables, lookup planners under a storage budget, fused and sharded lookups, a DLRM model.
- ``mlsys_jax.infer.video``: exact CNN inference on video (Wakatsuki et al., MLSys 2021): skip only the
  outputs that ReLU provably zeroes or that cannot have changed, tile by tile.
"""

__all__: list[str] = []   # nothing at package level: import mlsys_jax.infer.sensai / .microrec / .video
