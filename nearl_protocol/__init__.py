"""The contract between the coordinator (server/) and the hospital sites (client/).

Both sides import this package and neither owns it:

* :mod:`nearl_protocol.keys`: every record, config and metric key on the wire (one
  convention: kebab-case, Flower's own) and the MLflow names derived from them;
* :mod:`nearl_protocol.schema`: the one check "do these tensors match the agreed adapter
  layout", used by the site's egress check, the server's screening, checkpoints and
  adapter files (numpy only, no Flower);
* :mod:`nearl_protocol.flat`: adapters on the wire as one flat array per message, packed
  and read against the agreed schema (names, shapes, dtype, order);
* :mod:`nearl_protocol.arrays`: reading a serialized array only when its bytes agree with
  its metadata, and the payload hash both sides record;
* :mod:`nearl_protocol.messages`: a pair of functions per message (build and read the
  train/evaluate instruction, build and read the reply);
* :mod:`nearl_protocol.secagg`: secure aggregation's stages, record layouts, quantization
  and masks (the coordinator learns only the sum of the sites' updates);
* :mod:`nearl_protocol.processes`: helpers for Flower's command-line tools (SuperLink,
  SuperNode, ``flwr``), used by both CLIs, the simulation launcher and the tests.
"""
