"""identity: invitations an existing person accepts, sign-in throttles per source and account (and the
browsers a person signed in from, exempt from the wider locks), platform
administration as a step-up of a session or a platform key, one-time links by purpose

Revision ID: 0008_identity
Revises: 0007_tenant_upload_limit
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_identity"
down_revision = "0007_tenant_upload_limit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sign_in_throttles",
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "sign_in_devices",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    op.create_index(op.f("ix_sign_in_devices_username"), "sign_in_devices", ["username"], unique=False)
    op.create_table(
        "invitations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("invited_by", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_invitations_tenant_id"), "invitations", ["tenant_id"], unique=False)
    op.create_index(op.f("ix_invitations_user_id"), "invitations", ["user_id"], unique=False)
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("password_changed_at", sa.Float(), nullable=True))
        batch_op.drop_column("failed_logins")
        batch_op.drop_column("locked_until")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("platform", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("login_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("purpose", sa.String(length=16), nullable=False, server_default="setup"))
    with op.batch_alter_table("web_sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("via_link", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("platform_until", sa.Float(), nullable=True))
    # Keys made before this carried their person's platform power implicitly: keep it for platform admins' own
    # keys so an operator's scripts keep working; from now on a key has it only when minted for it.
    op.execute(
        "UPDATE api_keys SET platform = TRUE WHERE user_id IN (SELECT id FROM users WHERE is_platform_admin = TRUE)"
    )


def downgrade() -> None:
    with op.batch_alter_table("web_sessions", schema=None) as batch_op:
        batch_op.drop_column("platform_until")
        batch_op.drop_column("via_link")
    with op.batch_alter_table("login_tokens", schema=None) as batch_op:
        batch_op.drop_column("purpose")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("platform")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("locked_until", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("failed_logins", sa.Integer(), nullable=False, server_default="0"))
        batch_op.drop_column("password_changed_at")
    op.drop_index(op.f("ix_invitations_user_id"), table_name="invitations")
    op.drop_index(op.f("ix_invitations_tenant_id"), table_name="invitations")
    op.drop_table("invitations")
    op.drop_index(op.f("ix_sign_in_devices_username"), table_name="sign_in_devices")
    op.drop_table("sign_in_devices")
    op.drop_table("sign_in_throttles")
