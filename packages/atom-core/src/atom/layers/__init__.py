"""nn.Modules built from atom.ops: the pieces every model family is made of."""
