"""The config: how a schema is written (:mod:`~dpl.config.schema`), the top-level one
(:mod:`~dpl.config.root`), Hydra's ConfigStore from the registries (:mod:`~dpl.config.store`), the checks of
the command line (:mod:`~dpl.config.overrides`) and of the composed config (:mod:`~dpl.config.validate`),
earlier versions brought up to date (:mod:`~dpl.config.upgrade`), the study's ablations
(:mod:`~dpl.config.study`) and the generated reference (:mod:`~dpl.config.docs`)."""
