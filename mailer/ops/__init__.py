"""What ops look at: figures that add up across processes, read from Redis and SQL.

``figures`` gathers one snapshot; ``prometheus`` exposes it at ``/metrics``;
``status`` draws it for ``mailer status``. Nothing below this layer imports it.
"""
