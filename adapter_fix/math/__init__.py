"""Pure linear algebra on factors: the safety subspace and the solves. No I/O."""
