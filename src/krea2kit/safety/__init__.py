"""Content filters the Krea 2 licence requires (§4.2), their combination policy and audit log.

Nothing heavy is imported here: the image classifier loads onnxruntime only when it is built.
"""
