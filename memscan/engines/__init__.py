"""Engines: where the work of every stage that scales out runs, built at the edge and passed in.

knn (the Engine interface and the local engine), capture (the model and its capture pool), planning
(which chunks an extraction stores); ray_runner (the Ray engine) over ray_options, ray_knn, ray_capture
and ray_planning.
"""
