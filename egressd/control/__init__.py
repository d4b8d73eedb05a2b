"""Control plane: signs job policies, publishes keys, keeps the node and proxy registry."""
