"""Steps that run inside an agent's Pod, in the tools image: ``clone`` and ``finish``.

Run as ``python -m kapsis.k8s.inpod.clone`` / ``python -m kapsis.k8s.inpod.finish``; their
configuration is :class:`kapsis.k8s.layout.StepConfig` in ``$KAPSIS_STEP_CONFIG``.
"""
