from scheduling.management.commands._loop import LoopCommand


class Command(LoopCommand):
    help = "Run the reconciler: one tick with --once, else one tick every LOCALAI_RECONCILE_INTERVAL."
    interval_setting = "LOCALAI_RECONCILE_INTERVAL"

    def tick(self):
        from scheduling.reconciler import reconcile_tick

        return reconcile_tick()
