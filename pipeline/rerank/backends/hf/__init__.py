"""The transformers backend: ``engine`` (HFEngine), ``plan`` (tokenization and batch cuts),
``padded`` and ``packed`` (the two execution plans), ``attention`` and ``linear`` (kernels)."""
