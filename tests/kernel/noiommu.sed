# machines/qemu-q35.toml as the lane's guest boots without its IOMMU
# (tests/kernel/boot --no-iommu: no intel-iommu device): no IOMMU, no
# groups, no DMAR table, no interrupt remapping, intel_iommu=on gone.
# Used by sim.sh to derive the machine and by run to check the guest's
# snapshot against it.
s/^iommu = "intel"$/iommu = "none"/
/^group = [0-9]/d
s/ intel_iommu=on//
/^acpi_tables = /{
s/"DMAR", //
s/, "DMAR"//
s/"DMAR"//
}
s/^interrupt_remapping = true$/interrupt_remapping = false/
