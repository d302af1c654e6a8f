/*
 * The KVM probe guest (accel.py): a 64 KiB firmware image for QEMU's -bios, assembled by osbuilder
 * with binutils (as --32, ld --oformat binary -Ttext 0xf0000).
 *
 * From the reset vector it takes the road a kernel takes: real mode, protected mode, then long mode
 * with paging (identity-mapped 2 MiB pages, EFER.LME by wrmsr), and there it runs a loop of
 * ITERATIONS additions of STEP. The low byte of the sum goes to QEMU's isa-debug-exit port
 * (DEBUG_EXIT), so QEMU exits with status (byte << 1) | 1: a status only a guest that ran every
 * instruction can produce. accel.py defines ITERATIONS, STEP and DEBUG_EXIT (--defsym) and computes
 * the status it expects.
 *
 * Where KVM works, the loop takes milliseconds; where the host's (nested) KVM runs guest code
 * slower than software emulation or not at all, the guest does not finish within the probe's budget.
 */

    .set CODE32, 0x08
    .set DATA, 0x10
    .set CODE64, 0x18
    .set PML4, 0x1000
    .set PDPT, 0x2000
    .set PD, 0x3000
    .set CR0_PE, 0x1
    .set CR0_PG, 0x80000000
    .set CR4_PAE, 0x20
    .set MSR_EFER, 0xc0000080
    .set EFER_LME, 0x100
    .set PAGE_PRESENT_RW, 0x3
    .set PAGE_LARGE, 0x80

    .text
    .globl _start

/* 16-bit real mode at 0xf0000 (CS 0xf000, IP 0), where the reset vector jumps. */
    .code16
_start:
    cli
    lgdtl %cs:(gdt_pointer - _start)
    mov %cr0, %eax
    or $CR0_PE, %eax
    mov %eax, %cr0
    ljmpl $CODE32, $protected_mode

/* 32-bit protected mode, flat segments: build the page tables in RAM, enable PAE, LME, paging. */
    .code32
protected_mode:
    mov $DATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $PML4, %edi
    xor %eax, %eax
    mov $(3 * 4096 / 4), %ecx
    rep stosl
    movl $(PDPT | PAGE_PRESENT_RW), PML4
    movl $(PD | PAGE_PRESENT_RW), PDPT
    mov $PD, %edi
    mov $(PAGE_LARGE | PAGE_PRESENT_RW), %eax
fill_pd:
    mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    cmp $(PD + 4096), %edi
    jb fill_pd
    mov %cr4, %eax
    or $CR4_PAE, %eax
    mov %eax, %cr4
    mov $PML4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov %cr0, %eax
    or $CR0_PG, %eax
    mov %eax, %cr0
    ljmpl $CODE64, $long_mode

/* 64-bit long mode: the work, then the result to the debug-exit port. */
    .code64
long_mode:
    xor %eax, %eax
    mov $ITERATIONS, %ecx
add_step:
    add $STEP, %eax
    dec %ecx
    jnz add_step
    out %al, $DEBUG_EXIT
halt:
    hlt
    jmp halt

    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9b000000ffff /* CODE32: base 0, limit 4 GiB, execute/read, accessed */
    .quad 0x00cf93000000ffff /* DATA: base 0, limit 4 GiB, read/write, accessed */
    .quad 0x00af9b000000ffff /* CODE64: long mode, execute/read, accessed */
gdt_pointer:
    .word gdt_pointer - gdt - 1
    .long gdt

/* The reset vector: the CPU starts 16 bytes below the top of the image. */
    .org 0xfff0
    .code16
reset_vector:
    ljmp $0xf000, $0
    .org 0x10000
