"""nn.Modules free of I/O and Ray, and one registry of model builders (`raypipe.models.registry`)."""
