"""HTTP routes: image endpoints (``images``) and operational endpoints (``ops``)."""
