from django.apps import AppConfig


class LocalAIClusterConfig(AppConfig):
    name = "localai_cluster"
    verbose_name = "LocalAI Cluster"

    def ready(self) -> None:
        from localai_cluster import checks  # noqa: F401  (registers system checks)
        from localai_cluster.dbhealth import install_statement_deadline

        install_statement_deadline()
