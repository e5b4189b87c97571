"""The Output API's routes, one APIRouter per resource; app.py includes them under /v1."""
