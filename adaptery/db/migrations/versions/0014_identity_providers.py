"""identity providers (OpenID Connect single sign-on): providers, the tenants that trust them, role rules,
linked identities, sign-ins in flight, per-tenant sign-in policy; how each web session was signed in

Revision ID: 0014_identity_providers
Revises: 0010_usage_ledger
"""

import sqlalchemy as sa
from alembic import op

revision = "0014_identity_providers"
down_revision = "0013_model_names"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "identity_providers",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("display_name", sa.String(length=128), nullable=False),
        sa.Column("issuer", sa.String(length=512), nullable=False),
        sa.Column("client_id", sa.String(length=255), nullable=False),
        sa.Column("secret_sealed", sa.Text(), nullable=True),
        sa.Column("secret_key_id", sa.String(length=32), nullable=True),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("groups_claim", sa.String(length=64), nullable=False),
        sa.Column("username_claim", sa.String(length=64), nullable=False),
        sa.Column("managed_by_settings", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "tenant_identity_providers",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("provider_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.ForeignKeyConstraint(["provider_id"], ["identity_providers.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "provider_id"),
    )
    op.create_index(
        op.f("ix_tenant_identity_providers_tenant_id"), "tenant_identity_providers", ["tenant_id"], unique=False
    )
    op.create_table(
        "sso_role_rules",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("provider_id", sa.String(length=40), nullable=False),
        sa.Column("group_name", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.ForeignKeyConstraint(["provider_id"], ["identity_providers.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "provider_id", "group_name"),
    )
    op.create_index(op.f("ix_sso_role_rules_tenant_id"), "sso_role_rules", ["tenant_id"], unique=False)
    op.create_table(
        "sso_identities",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("provider_id", sa.String(length=40), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("groups", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_sign_in_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["provider_id"], ["identity_providers.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("provider_id", "subject"),
    )
    op.create_index(op.f("ix_sso_identities_user_id"), "sso_identities", ["user_id"], unique=False)
    op.create_table(
        "oidc_sign_ins",
        sa.Column("state_hash", sa.String(length=64), nullable=False),
        sa.Column("browser_hash", sa.String(length=64), nullable=False),
        sa.Column("provider_id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=True),
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("code_verifier", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["provider_id"], ["identity_providers.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("state_hash"),
    )
    op.create_index(op.f("ix_oidc_sign_ins_expires_at"), "oidc_sign_ins", ["expires_at"], unique=False)
    op.create_table(
        "tenant_sign_in_policies",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("password_sign_in", sa.Boolean(), nullable=False),
        sa.Column("link_sign_in", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("tenant_id"),
    )
    with op.batch_alter_table("web_sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sign_in_method", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("identity_provider_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("id_token", sa.Text(), nullable=True))
        batch_op.create_foreign_key(
            "fk_web_sessions_identity_provider_id",
            "identity_providers",
            ["identity_provider_id"],
            ["id"],
            ondelete="CASCADE",
        )


def downgrade() -> None:
    with op.batch_alter_table("web_sessions", schema=None) as batch_op:
        batch_op.drop_constraint("fk_web_sessions_identity_provider_id", type_="foreignkey")
        batch_op.drop_column("id_token")
        batch_op.drop_column("identity_provider_id")
        batch_op.drop_column("sign_in_method")
    op.drop_table("tenant_sign_in_policies")
    op.drop_index(op.f("ix_oidc_sign_ins_expires_at"), table_name="oidc_sign_ins")
    op.drop_table("oidc_sign_ins")
    op.drop_index(op.f("ix_sso_identities_user_id"), table_name="sso_identities")
    op.drop_table("sso_identities")
    op.drop_index(op.f("ix_sso_role_rules_tenant_id"), table_name="sso_role_rules")
    op.drop_table("sso_role_rules")
    op.drop_index(op.f("ix_tenant_identity_providers_tenant_id"), table_name="tenant_identity_providers")
    op.drop_table("tenant_identity_providers")
    op.drop_table("identity_providers")
