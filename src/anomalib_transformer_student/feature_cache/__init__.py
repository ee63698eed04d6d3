"""The teacher-feature cache: the frozen teacher runs once per image in a run, not once per epoch.

- :mod:`.settings`: :class:`CacheSettings`, the options, checked once.
- :mod:`.run_folder`: the cache folder's checks, each run's own folder, what may be removed.
- :mod:`.spill_file`: one process's entries and index on disk.
- :mod:`.store`: :class:`FeatureStore`, memory then disk within the budgets; image keys.
- :mod:`.callback`: :class:`FeatureCacheCallback`, the stores' life in a Lightning run.
"""
