"""Training objectives: each module holds one objective (an ``nn.Module`` owning its extra parameters) and
the dataclass of its ``objective.*`` settings. :data:`nextlat.registry.OBJECTIVES` names them."""
