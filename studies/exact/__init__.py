"""The machinery of the exact-dual study (`studies.exact_dual`), on top of the chain study's
(`studies.chain`: models, training recipe, refinements, evaluation of the chain):

- `runs`: the data (the ring, the 8x8 digits, an MNIST subset), one trained PrimalDual per (data, f,
  lambda) evaluated against the exact dual on its samples, and the exact dual on a FIXED generator
  across lambda;
- `potential_fit`: part 5, whether regressing the data critic onto the exact dual's potentials raises
  its certified value;
- `report`: the tables, result files and the figure.
"""
