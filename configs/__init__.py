"""The YAML recipes, shipped as package data so `c2m init` can write the demo config from an installed wheel."""
