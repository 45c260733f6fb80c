/*
 * The bench's guest: a multiboot kernel (QEMU loads it with -kernel and enters it in flat
 * 32-bit protected mode, paging off, interrupts off) that walks a region of guest RAM page
 * by page, forever, in one of three orders, writing a marker into every page it touches.
 *
 * GNU as, AT&T syntax, no preprocessor: as --32 guest.S; ld -m elf_i386 -N -Ttext=0x100000.
 * The harness (emu/qemu/guest.py) patches PARAMS in a copy of the image and reads STATUS
 * back from guest memory; the offsets below are part of that contract.
 *
 * Each page touched gets, at its first 8 bytes, (its physical address XOR MARK) and the
 * number of the pass that wrote it, so the page is never a zero page (QEMU would send a zero
 * page as a header only) and the memory image can be checked after a migration: every page
 * the current pass has reached holds the current pass number, every other page the previous.
 */
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000002       /* bit 1: give us the memory map (mem_upper) */
        .set MB_BOOTED, 0x2BADB002      /* eax when a multiboot loader entered us */
        .set MARK, 0x50434547           /* "GECP": the page marker's key */
        .set LCG_A, 1664525             /* a = 1 mod 4, c odd: full period mod 2^k */
        .set LCG_C, 1013904223

        .text
        .globl start
image:
        /* Multiboot header: within the image's first 8 KiB, 4-byte aligned. */
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

        .org 0x40
params:                                 /* 0x100040: written by the harness */
        .ascii "PCEGUEST"               /* +0  magic */
        .long 1                         /* +8  layout version */
p_pattern:
        .long 0                         /* +12 0 ascending, 1 stride, 2 random (LCG) */
p_base:
        .long 0x200000                  /* +16 physical address of the first page */
p_npages:
        .long 256                       /* +20 pages in the region */
p_stride:
        .long 1                         /* +24 pages per step (pattern 1), < npages, coprime */
p_seed:
        .long 0                         /* +28 first LCG value of every pass (pattern 2) */
p_mask:
        .long 0                         /* +32 2^k - 1 >= npages - 1 (pattern 2) */

        .org 0x80
status:                                 /* 0x100080: read by the harness */
        .ascii "PCESTATE"               /* +0  magic */
s_state:
        .long 0                         /* +8  0 not started, 1 running, 2 refused */
s_pass:
        .long 0                         /* +12 current pass, from 1 */
s_index:
        .long 0                         /* +16 positions of this pass already written */
s_error:
        .long 0                         /* +20 why refused: 1 region outside RAM, 2 loader */

        .org 0x100
start:
        cli
        cmpl $MB_BOOTED, %eax
        jne refuse_loader
        /* mem_upper (KiB above 1 MiB) bounds the region, when the loader gave it. */
        testl $1, (%ebx)
        jz checked
        movl 8(%ebx), %ecx
        shll $10, %ecx
        addl $0x100000, %ecx
        movl p_npages, %eax
        shll $12, %eax
        addl p_base, %eax
        jc refuse_region
        cmpl %ecx, %eax
        ja refuse_region
checked:
        movl $1, s_state

next_pass:
        incl s_pass
        movl $0, s_index
        movl p_npages, %edi             /* edi: positions left in this pass */
        xorl %esi, %esi                 /* esi: page number within the region */
        cmpl $2, p_pattern
        jne touch
        movl p_seed, %esi
        andl p_mask, %esi
        cmpl p_npages, %esi
        jae lcg_step

touch:
        movl %esi, %eax
        shll $12, %eax
        addl p_base, %eax
        movl %eax, %edx
        xorl $MARK, %edx
        movl %edx, (%eax)
        movl s_pass, %edx
        movl %edx, 4(%eax)
        /* The page is written before the index moves past it: a stop in between leaves
           the page at position index already holding this pass. The touches so far are
           (pass - 1) * npages + index, one counter so that no stop falls between two. */
        incl s_index
        decl %edi
        jz next_pass

        movl p_pattern, %eax
        cmpl $1, %eax
        je stride_step
        cmpl $2, %eax
        je lcg_step
        incl %esi
        jmp touch
stride_step:
        addl p_stride, %esi
        cmpl p_npages, %esi
        jb touch
        subl p_npages, %esi
        jmp touch
lcg_step:
        /* x = (a x + c) mod 2^k, skipping values past the region: every pass visits each
           page once, in the same order. */
        imull $LCG_A, %esi, %esi
        addl $LCG_C, %esi
        andl p_mask, %esi
        cmpl p_npages, %esi
        jae lcg_step
        jmp touch

refuse_loader:
        movl $2, s_error
        jmp refuse
refuse_region:
        movl $1, s_error
refuse:
        movl $2, s_state
halt:
        hlt
        jmp halt
