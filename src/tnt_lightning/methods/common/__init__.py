"""What several methods share, apart from the methods themselves: base classes (staged methods,
learned methods, Haurum et al.'s absolute-rate methods), keep-count rules, similarity pruning, TPS's
squeeze and learned soft merging."""
