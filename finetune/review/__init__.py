"""The review store and what is done with its feedback: the database (`store`, `tables`, migrations), the
boundary models (`schema`), cleaning (`cleaning`) and the training records built from it (`records`).

SQLAlchemy, Alembic and krippendorff come with the `review` extra; `schema` imports none of them.
"""
