"""Package data read through importlib.resources: the WordNet thesaurus, the LM reference text and the starter sample corpus (see README.md here)."""
